"""A fleet behind a broker whose packet limit is smaller than its model, as on managed brokers
(128-256 KB a message): dense updates, the global model in every downlink mode and its deltas
travel in chunks (edgefl/chunking.py), train exactly as when they travel whole, and reach a
device that joins late. Every packet is watched on the wire and held to the limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker import PrivateBroker
from broker.limits import limits_for_model
from device.agent import DeviceAgent
from edgefl.config import ModelConfig
from edgefl.data import Dataset, dirichlet_partition
from edgefl.messages import BlobManifest
from edgefl.mqtt import MqttLink
from tests.conftest import FLEET, Fleet, wait_until

LIMIT = 8192  # a dense update of mlp_digits (38 KB) is five chunks, the fp32 model six
MNIST_LIMIT = 256 * 1024  # a managed broker's; mlp_mnist's dense fp32 is 407 KB


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """This module's broker (make_fleet's too): the packet limit far below the model."""
    with PrivateBroker(FLEET, workdir=tmp_path / "broker", max_packet_size=LIMIT) as b:
        yield b


class Wire:
    """Every message of the fleet as the broker passes it on, seen by the monitor account."""

    def __init__(self, broker: PrivateBroker) -> None:
        self.seen: list[tuple[str, bytes, int]] = []  # topic, payload, packet bytes
        self._lock = threading.Lock()
        self.link = MqttLink("test-wire", broker.broker_config(broker.monitor), clean_start=True)
        self.link.subscribe(f"edgefl/{FLEET}/#", self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.seen.append((topic, payload, _packet_bytes(topic, payload)))

    def topics(self, part: str) -> list[str]:
        with self._lock:
            return [t for t, p, _ in self.seen if part in t and p]

    def largest(self) -> int:
        with self._lock:
            return max(n for _, _, n in self.seen)

    def __enter__(self) -> Wire:
        self.link.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.link.stop()


def _packet_bytes(topic: str, payload: bytes) -> int:
    """The MQTT 5 PUBLISH packet (QoS 1, no properties) that carries ``payload``."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + len(payload)
    varint = 1
    while remaining >= 128**varint:
        varint += 1
    return 1 + varint + remaining


def _run(fleet: Fleet, devices: int, rounds: int, model: str = "mlp_digits", **codec):
    """``rounds`` rounds over ``devices`` agents running ``model``; the final weights and the
    round metrics."""
    agents = [fleet.start_agent(i, model=ModelConfig(model)) for i in range(devices)]
    cfg = fleet.aggregator_config(rounds=rounds)
    cfg.model = ModelConfig(model)
    for k, v in codec.items():
        setattr(cfg.codec, k, v)
    with fleet.aggregator(cfg) as agg:
        history = agg.run()
        # devices hold what the aggregator holds: it adopts the model as they decode it
        wait_until(lambda: all(a.model_version == agg.version for a in agents), what="models")
        for a in agents:
            for k, v in agg.weights.items():
                np.testing.assert_array_equal(a.global_model.weights[k], v)
        weights = {k: v.copy() for k, v in agg.weights.items()}
    return weights, history


def _mnist_fleet(broker: PrivateBroker, tmp: Path, digits, devices: int) -> Fleet:
    """The digits drawn at 28x28 (each pixel 3x3, a border of 2) for the 784-128-10 MLP."""

    def big(ds: Dataset) -> Dataset:
        img = np.kron(ds.X.reshape(-1, 8, 8), np.ones((3, 3), dtype=np.float32))
        return Dataset(np.pad(img, ((0, 0), (2, 2), (2, 2))).reshape(len(ds.X), 784), ds.y)

    train, test = (big(ds) for ds in digits)
    parts = dirichlet_partition(train.y, devices, 0.5, seed=0, min_samples=10)
    return Fleet(broker, tmp, [Dataset(train.X[p], train.y[p]) for p in parts], test)


def test_mlp_mnist_behind_a_256_kb_limit_trains_as_over_an_unlimited_broker(
    tmp_path: Path, digits
) -> None:
    rounds, devices = 2, 3
    results = {}
    for limit in (MNIST_LIMIT, None):
        tmp = tmp_path / str(limit)
        # the limits the demo's broker takes for this model, capped by [demo] max_packet_bytes
        limits = limits_for_model("mlp_mnist", max_packet_bytes=limit or 0)
        with PrivateBroker(FLEET, workdir=tmp / "broker", limits=limits) as b:
            fleet = _mnist_fleet(b, tmp, digits, devices)
            try:
                with Wire(b) as wire:
                    # without zstd, which squeezes this model's many zero deltas (the digits'
                    # blank border) below the limit: a CNN's dense update barely compresses
                    results[limit] = _run(fleet, devices, rounds, "mlp_mnist", zstd=False)
                    if limit is not None:
                        # a device that joins now finds the retained manifest and chunks
                        late = DeviceAgent(
                            fleet.device_config("dev-late", model=ModelConfig("mlp_mnist")),
                            fleet.data[0],
                            executor=fleet.executor,
                        )
                        fleet.agents[late.id] = late.start()
                        wait_until(lambda a=late: a.model_version == rounds, what="the late one")
                        for k, v in results[limit][0].items():
                            np.testing.assert_array_equal(late.global_model.weights[k], v)
                    largest, chunked = wire.largest(), wire.topics("/blob/")
            finally:
                fleet.close()
        if limit is not None:
            assert largest <= limit
            assert len([t for t in chunked if "/update/blob/" in t]) == rounds * devices * 2
            assert any("/model/global/blob/" in t for t in chunked)
        else:
            assert largest > 4 * 101_770 and not chunked  # the same model, whole
    (chunked_w, chunked_h), (whole_w, whole_h) = results[MNIST_LIMIT], results[None]
    # the same training; only the order in which updates were summed may differ
    for k in whole_w:
        np.testing.assert_allclose(chunked_w[k], whole_w[k], rtol=0, atol=1e-6)
    assert [m.accuracy for m in chunked_h] == pytest.approx([m.accuracy for m in whole_h], abs=2e-3)
    assert [m.uplink_bytes for m in chunked_h] == [m.uplink_bytes for m in whole_h]
    assert chunked_h[-1].accuracy > 0.5


@pytest.mark.parametrize("downlink", ["fp16", "int8", "delta"])
def test_every_downlink_travels_in_chunks_and_devices_hold_the_aggregators_model(
    make_fleet, broker, downlink: str
) -> None:
    fleet = make_fleet(devices=2)
    with Wire(broker) as wire:
        _, history = _run(fleet, 2, 3, downlink=downlink)
        chunked = wire.topics("/blob/")
        largest = wire.largest()
    assert [m.reported for m in history] == [2, 2, 2] and history[-1].accuracy > 0.5
    assert largest <= LIMIT
    assert any("/model/global/blob/" in t for t in chunked)
    if downlink == "delta":
        assert any("/model/delta/blob/" in t for t in chunked)
        assert all(a.sync.deltas_applied >= 1 for a in fleet.agents.values())
    assert all(a.stats.rejected == {} for a in fleet.agents.values())


def test_only_the_current_models_chunks_stay_retained_even_after_a_restart(
    make_fleet, broker
) -> None:
    fleet = make_fleet(devices=2)
    for i in range(2):
        fleet.start_agent(i)
    cfg = fleet.aggregator_config(rounds=3)
    with fleet.aggregator(cfg) as agg:
        agg.run()
    with fleet.aggregator(cfg) as agg:  # a restart publishes the model again, a new blob
        assert agg.version == 3

    def retained() -> tuple[BlobManifest, set[str]]:
        got: dict[str, bytes] = {}
        with MqttLink("test-late", broker.broker_config(broker.monitor), clean_start=True) as m:
            m.subscribe(f"edgefl/{FLEET}/model/global/#", lambda t, p: got.__setitem__(t, p))
            wait_until(lambda: f"edgefl/{FLEET}/model/global" in got, what="the manifest")
            manifest = BlobManifest.from_payload(
                got[f"edgefl/{FLEET}/model/global"], kind="model", max_bytes=1 << 20
            )
            wait_until(lambda: len(got) > manifest.blob.count, what="the chunks")
            time.sleep(0.3)  # any more retained chunks would come with these
        return manifest, {t for t in got if "/blob/" in t}

    manifest, chunks = retained()
    assert manifest.version == 3
    assert chunks == {
        f"edgefl/{FLEET}/model/global/blob/{manifest.blob.id}/{i}"
        for i in range(manifest.blob.count)
    }


def test_a_limit_set_in_the_config_holds_where_the_broker_allows_more(tmp_path, digits) -> None:
    """A managed broker may cap messages without saying so in its CONNACK: ``[broker]
    max_packet_bytes`` then keeps every sender under it."""
    train, test = digits
    parts = dirichlet_partition(train.y, 2, 0.5, seed=0, min_samples=10)
    with PrivateBroker(FLEET, workdir=tmp_path / "broker") as b:  # announces 164 KiB
        fleet = Fleet(b, tmp_path, [Dataset(train.X[p], train.y[p]) for p in parts], test)
        try:
            with Wire(b) as wire:
                for i in range(2):
                    cfg = fleet.device_config(f"dev-{i}")
                    cfg.broker.max_packet_bytes = LIMIT
                    agent = DeviceAgent(cfg, fleet.data[i], executor=fleet.executor)
                    fleet.agents[agent.id] = agent.start()
                agg_cfg = fleet.aggregator_config(rounds=2)
                agg_cfg.broker.max_packet_bytes = LIMIT
                with fleet.aggregator(agg_cfg) as agg:
                    assert agg.link.max_packet_size > LIMIT == agg.link.packet_limit
                    history = agg.run()
                largest = wire.largest()
                chunked = wire.topics("/blob/")
        finally:
            fleet.close()
    assert [m.reported for m in history] == [2, 2]
    assert largest <= LIMIT
    assert any("/update/blob/" in t for t in chunked)
    assert any("/model/global/blob/" in t for t in chunked)
