"""One synchronous round: who was asked, what has been folded in, and when it must close."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from edgefl.aggregation import WeightedSum
from edgefl.compression import ModelSpec
from edgefl.messages import Update


class Duplicate(Exception):
    """The update was already folded in (QoS 1 delivers at least once)."""


class NotParticipant(Exception):
    """The device was not asked to work in this round."""


@dataclass
class RoundResult:
    number: int
    base_version: int
    participants: list[str]
    accepted: dict[str, dict[str, float]]  # device -> its update's metrics
    samples: int
    closed_by: str  # "all_reported" | "deadline" | "no_one_left"
    uplink_bytes: int
    last_update_s: float = 0.0
    opened_at: float = 0.0
    rejected: Counter[str] = field(default_factory=Counter)


class Round:
    def __init__(
        self,
        number: int,
        base_version: int,
        participants: list[str],
        deadline: float,
        spec: ModelSpec,
    ) -> None:
        self.number = number
        self.base_version = base_version
        self.participants = list(participants)
        self.deadline = deadline  # unix time
        self.opened_at = time.time()
        self._opened = time.perf_counter()
        self.last_update_s = 0.0  # from opening to the last accepted update
        self.sum = WeightedSum(spec)
        self.accepted: dict[str, dict[str, float]] = {}
        self.samples = 0
        self.uplink_bytes = 0
        self.rejected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def offer(self, update: Update, payload_bytes: int) -> None:
        """Fold ``update`` in, exactly once; raises Duplicate or NotParticipant otherwise."""
        with self._lock:
            if update.device_id not in self.participants:
                raise NotParticipant(update.device_id)
            if update.device_id in self.accepted:
                raise Duplicate(update.device_id)
            self.sum.add(update.delta, float(update.num_samples))
            self.accepted[update.device_id] = update.metrics
            self.samples += update.num_samples
            self.uplink_bytes += payload_bytes
            self.last_update_s = time.perf_counter() - self._opened
            self.changed.notify_all()

    def count_rejection(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    @property
    def reported(self) -> int:
        with self._lock:
            return len(self.accepted)

    def missing(self) -> list[str]:
        with self._lock:
            return [d for d in self.participants if d not in self.accepted]

    def wait(self, still_alive, poll_s: float = 0.2) -> str:
        """Block until every participant reported, the deadline passed, or no one is left who
        could still report (all the missing went offline). Returns which."""
        with self._lock:
            while True:
                if len(self.accepted) == len(self.participants):
                    return "all_reported"
                left = self.deadline - time.time()
                if left <= 0:
                    return "deadline"
                missing = [d for d in self.participants if d not in self.accepted]
                if not any(still_alive(d) for d in missing):
                    return "no_one_left"
                self.changed.wait(min(left, poll_s))

    def wake(self) -> None:
        with self._lock:
            self.changed.notify_all()

    def result(self, closed_by: str) -> RoundResult:
        with self._lock:
            return RoundResult(
                number=self.number,
                base_version=self.base_version,
                participants=list(self.participants),
                accepted=dict(self.accepted),
                samples=self.samples,
                closed_by=closed_by,
                uplink_bytes=self.uplink_bytes,
                last_update_s=self.last_update_s,
                opened_at=self.opened_at,
                rejected=Counter(self.rejected),
            )
