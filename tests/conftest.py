"""Shared fixtures: a private Mosquitto per test (from broker/'s own configuration, on a free
loopback port), the digits data split over a few devices, and helpers to run a small fleet
in this process, each agent with its own MQTT connection."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.service import Aggregator
from broker import PrivateBroker
from device.agent import DeviceAgent
from edgefl.config import AggregatorConfig, DeviceConfig
from edgefl.data import Dataset, dirichlet_partition, load_digits_split

FLEET = "test"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_split()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    with PrivateBroker(FLEET, workdir=tmp_path / "broker") as b:
        yield b


def wait_until(
    check: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
    retry_on: tuple[type[Exception], ...] = (),
) -> None:
    """Poll ``check`` until it holds; an exception of a ``retry_on`` type (a refused connection
    while a broker starts, say) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except retry_on:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Fleet:
    """A small fleet in this process: agents plus an aggregator, all on the private broker."""

    broker: PrivateBroker
    tmp: Path
    data: list[Dataset]
    test: Dataset
    agents: dict[str, DeviceAgent] = field(default_factory=dict)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8))

    def device_config(self, device_id: str, **overrides) -> DeviceConfig:
        cfg = DeviceConfig(
            fleet=FLEET,
            device_id=device_id,
            broker=self.broker.broker_config(self.broker.device_account(device_id)),
            state_dir=str(self.tmp / "devices" / device_id),
            telemetry_interval_s=1.0,
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    def start_agent(self, index: int, **overrides) -> DeviceAgent:
        device_id = f"dev-{index}"
        agent = DeviceAgent(
            self.device_config(device_id, **overrides), self.data[index], executor=self.executor
        )
        self.agents[device_id] = agent
        return agent.start()

    def aggregator_config(self, **rounds) -> AggregatorConfig:
        cfg = AggregatorConfig(
            fleet=FLEET,
            broker=self.broker.broker_config(self.broker.aggregator),
            state_dir=str(self.tmp / "aggregator"),
        )
        cfg.rounds.min_devices = len(self.data)
        cfg.rounds.wait_for_devices_s = 10.0
        cfg.rounds.deadline_s = 10.0
        for k, v in rounds.items():
            setattr(cfg.rounds, k, v)
        return cfg

    def aggregator(self, cfg: AggregatorConfig | None = None) -> Aggregator:
        return Aggregator(cfg or self.aggregator_config(), eval_data=self.test)

    def close(self) -> None:
        for agent in self.agents.values():
            try:
                agent.stop()
            except Exception:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def make_fleet(broker: PrivateBroker, tmp_path: Path, digits) -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(devices: int = 4, alpha: float = 0.5, seed: int = 0) -> Fleet:
        train, test = digits
        parts = dirichlet_partition(train.y, devices, alpha, seed=seed, min_samples=10)
        fleet = Fleet(broker, tmp_path, [Dataset(train.X[p], train.y[p]) for p in parts], test)
        fleets.append(fleet)
        return fleet

    yield make
    for f in fleets:
        f.close()


def finite(weights: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(w).all() for w in weights.values())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a private broker are marked ``broker`` (so that ``pytest -m "not broker
    and not slow"`` runs the unit tests alone, in seconds); modules that start brokers or
    processes of their own say so with ``pytestmark``."""
    for item in items:
        if {"broker", "make_fleet"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)
