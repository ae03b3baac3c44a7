"""Who works in a round, and how much: the round's plan.

The plan here is the plain one: every eligible device (online, recent telemetry), or a seeded
random sample of ``rounds.participants`` of them, each given the configured workload.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from aggregator.registry import DeviceRegistry
from edgefl.compression import make_codec
from edgefl.config import AggregatorConfig
from edgefl.messages import Task


@dataclass
class Plan:
    participants: list[str]
    tasks: dict[str, Task]  # one per participant
    deadline: float  # unix time


class Scheduler:
    def __init__(self, cfg: AggregatorConfig, registry: DeviceRegistry) -> None:
        self.cfg = cfg
        self.registry = registry

    def eligible(self) -> list[str]:
        rc = self.cfg.rounds
        return [r.device_id for r in self.registry.online(rc.telemetry_max_age_s)]

    def plan(self, number: int, base_version: int) -> Plan | None:
        """The round's participants and their tasks, or None if no device can take part."""
        rc = self.cfg.rounds
        chosen = self.eligible()
        if not chosen:
            return None
        if rc.participants and len(chosen) > rc.participants:
            rng = random.Random(self.cfg.seed * 100_003 + number)
            chosen = sorted(rng.sample(chosen, rc.participants))
        deadline = time.time() + rc.deadline_s
        task = Task(
            round=number,
            base_version=base_version,
            epochs=self.cfg.train.epochs,
            batch_size=self.cfg.train.batch_size,
            lr=self.cfg.train.lr,
            codec=make_codec(self.cfg.codec.name).spec(),
            deadline=deadline,
        )
        return Plan(chosen, {d: task for d in chosen}, deadline)
