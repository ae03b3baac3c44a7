"""One synchronous round: who was asked, what has been folded in, and when it must close; and
:class:`Sink`, the interface intake folds updates through (a round, or the buffer of
asynchronous mode)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from aggregator.aggregation import Accumulator, Contribution, WeightedSum
from edgefl.compression import ModelSpec
from edgefl.messages import Update

# the local steps assumed for a device whose task set no cap and whose update names none
NO_CAP = 10_000_000


Ack = Callable[[], None]
Hold = Callable[[Ack], None]  # keeps an acknowledgement until a checkpoint is on the disk


class Duplicate(Exception):
    """The update was already folded in (QoS 1 delivers at least once); the message says
    where.

    ``hold`` is where the acknowledgement of this copy must wait, while the original's has not
    gone out yet (None: acknowledge it at once). After a dropped connection the broker
    redelivers the original message: acknowledging that copy at once would let the broker
    forget an update that no checkpoint holds yet, lost if the aggregator then dies."""

    def __init__(self, message: str, hold: Hold | None = None) -> None:
        super().__init__(message)
        self.hold = hold


class NotParticipant(Exception):
    """The device was not asked for this update; the message says what it was asked."""


class Sink(Protocol):
    """What intake folds a validated update into: the open :class:`Round` in synchronous mode,
    the buffer of aggregator/asynchronous.py in asynchronous mode. Intake knows no other."""

    sent_at: dict[str, float]  # unix time each device's (latest) task went out

    def expected(self) -> tuple[int | None, int | None]:
        """The round and base version every update must name; None where :meth:`offer`
        checks them per update."""

    def admits(self, device_id: str, round_: int, base_version: int) -> tuple[str, str] | None:
        """Why an update from ``device_id`` for ``round_`` (in asynchronous mode its task) on
        ``base_version`` cannot be folded in, whatever it holds: (reason, detail), or None. A
        chunked update is checked so before its chunks take any memory."""

    def is_open(self, round_: int) -> bool:
        """Whether updates for ``round_`` (a task, in asynchronous mode) may still arrive."""

    def offer(self, update: Update, payload_bytes: int) -> None:
        """Fold ``update`` in exactly once; raises Duplicate, NotParticipant or WireError."""

    def hold_ack(self, ack: Callable[[], None]) -> None:
        """Keep the broker's acknowledgement of the update just offered until the checkpoint
        that holds it is on the disk."""

    def withdraw(self, device_id: str, kind: str, round_: int | None = None) -> bool:
        """A device replied that it sends no update for task ``round_``; False if that was no
        outstanding work of it."""

    def count_rejection(self, reason: str) -> None: ...

    def add_energy(self, device_id: str, joules: float) -> None: ...

    def progress(self) -> tuple[int, int, int]:
        """(round, updates folded in, updates expected), for the aggregator's status."""

    def waiting_on(self) -> tuple[list[str], float | None]:
        """The devices whose updates it still waits for (sorted), and the unix time by which it
        stops waiting at the latest (None: each task has its own deadline)."""

    def wake(self) -> None:
        """Something changed (a device went offline, an update was accepted)."""


@dataclass
class RoundResult:
    number: int
    base_version: int
    participants: list[str]
    accepted: dict[str, dict[str, float]]  # device -> its update's metrics
    samples: int
    closed_by: str  # "all_reported" | "deadline" | "no_one_left" | "enough" (overcommit)
    uplink_bytes: int
    last_update_s: float = 0.0
    opened_at: float = 0.0
    rejected: Counter[str] = field(default_factory=Counter)
    # devices that replied instead of updating: device -> "declined" | "late" | "superseded"
    withdrawn: dict[str, str] = field(default_factory=dict)
    energy_j: dict[str, float] = field(default_factory=dict)  # device -> estimate for its work
    effective_steps: float | None = None  # FedNova's tau_eff


class Round:
    def __init__(
        self,
        number: int,
        base_version: int,
        participants: list[str],
        deadline: float,
        spec: ModelSpec,
        *,
        enough: int | None = None,
        enough_grace: float = 0.0,
        step_caps: dict[str, int] | None = None,
        accumulator: Accumulator | None = None,
    ) -> None:
        self.number = number
        self.base_version = base_version
        self.participants = list(participants)
        self.deadline = deadline  # unix time
        self.opened_at = time.time()
        self.started_at = self._opened = time.perf_counter()
        self.opening: dict[str, float] = {}  # seconds the aggregator took to plan and send tasks
        self.last_update_s = 0.0  # from opening to the last accepted update
        # what accepted updates are folded into (aggregator/aggregation.py; the sample-weighted mean
        # by default). The steps a device claims are held to what its task allowed (step_caps),
        # so that no one can inflate its weight under FedNova by claiming fewer
        self.sum: Accumulator = accumulator if accumulator is not None else WeightedSum(spec)
        self.step_caps = dict(step_caps or {})
        self.enough = enough  # close once this many reported (overcommit); None: wait for all
        self.enough_grace = enough_grace  # ... and the rest had this fraction longer
        self._enough_at: float | None = None
        self.withdrawn: dict[str, str] = {}
        self.energy_j: dict[str, float] = {}
        self.sent_at: dict[str, float] = {}  # unix time each device's task went out
        self.accepted: dict[str, dict[str, float]] = {}
        self.samples = 0
        self.uplink_bytes = 0
        self.rejected: Counter[str] = Counter()
        # acknowledgements of accepted updates, sent to the broker once the round is
        # checkpointed: until then the broker holds each update and would redeliver it
        self._acks: list[Callable[[], None]] = []
        self._released = False
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def header(self) -> dict:
        """What a restarted aggregator needs to take this round up again."""
        return {
            "number": self.number,
            "base_version": self.base_version,
            "participants": self.participants,
            "deadline": self.deadline,
            "opened_at": self.opened_at,
            "enough": self.enough,
            "enough_grace": self.enough_grace,
            "step_caps": self.step_caps,
        }

    def expected(self) -> tuple[int | None, int | None]:
        return self.number, self.base_version

    def progress(self) -> tuple[int, int, int]:
        with self._lock:
            return self.number, len(self.accepted), len(self.participants)

    def waiting_on(self) -> tuple[list[str], float | None]:
        with self._lock:
            done = self.accepted.keys() | self.withdrawn.keys()
            return sorted(d for d in self.participants if d not in done), self.deadline

    def hold_ack(self, ack: Callable[[], None]) -> None:
        with self._lock:
            if not self._released:
                self._acks.append(ack)
                return
        ack()  # the round's checkpoint is on the disk already

    def release_acks(self) -> int:
        """Acknowledge every accepted update to the broker (after the checkpoint)."""
        with self._lock:
            self._released = True
            acks, self._acks = self._acks, []
        for ack in acks:
            ack()
        return len(acks)

    def admits(self, device_id: str, round_: int, base_version: int) -> tuple[str, str] | None:
        if round_ != self.number:
            return "round", f"update for round {round_}, round {self.number} is open"
        if base_version != self.base_version:
            return "base_version", (
                f"update built on v{base_version}, round {self.number} builds on "
                f"v{self.base_version}"
            )
        with self._lock:
            if device_id not in self.participants:
                return "not_participant", f"not asked to work in round {self.number}"
        return None

    def is_open(self, round_: int) -> bool:
        return round_ == self.number

    def offer(self, update: Update, payload_bytes: int) -> None:
        """Fold ``update`` in, exactly once; raises Duplicate or NotParticipant otherwise."""
        with self._lock:
            if update.device_id not in self.participants:
                raise NotParticipant(f"not asked to work in round {self.number}")
            if update.device_id in self.accepted:
                raise Duplicate(f"round {self.number} update already folded in", self.hold_ack)
            if update.device_id in self.withdrawn:
                # it said it would not report
                raise NotParticipant(f"withdrew from round {self.number}")
            cap = self.step_caps.get(update.device_id, NO_CAP)
            steps = min(max(update.metrics.get("steps", cap), 1.0), max(cap, 1))
            self.sum.fold(
                Contribution(
                    update.device_id,
                    update.delta,
                    float(update.num_samples),
                    float(steps),
                    update.base_version,
                )
            )
            self.accepted[update.device_id] = update.metrics
            self.samples += update.num_samples
            self.uplink_bytes += payload_bytes
            self.last_update_s = time.perf_counter() - self._opened
            self.changed.notify_all()

    def aggregate(self) -> dict[str, np.ndarray] | None:
        """The round's combined delta, or None if nothing was accepted."""
        with self._lock:
            return self.sum.aggregate()

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

    def withdraw(self, device_id: str, kind: str, round_: int | None = None) -> bool:
        """A participant replied that it will send no update for round ``round_`` (declined,
        gave up); the round stops waiting for it. False if it was not an outstanding
        participant of this round."""
        with self._lock:
            if (
                (round_ is not None and round_ != self.number)
                or device_id not in self.participants
                or device_id in self.accepted
                or device_id in self.withdrawn
            ):
                return False
            self.withdrawn[device_id] = kind
            self.changed.notify_all()
            return True

    def add_participant(self, device_id: str, step_cap: int = 0) -> None:
        """A replacement joins the open round."""
        with self._lock:
            if device_id not in self.participants:
                self.participants.append(device_id)
                if step_cap:
                    self.step_caps[device_id] = step_cap
            self.changed.notify_all()

    def add_energy(self, device_id: str, joules: float) -> None:
        with self._lock:
            self.energy_j[device_id] = self.energy_j.get(device_id, 0.0) + joules

    def wait(self, still_alive, poll_s: float = 0.2) -> str:
        """Block until every participant reported (or replied that it will not), enough did
        (overcommit), the deadline passed, or no one is left who could still report (all the
        missing went offline). Returns which."""
        with self._lock:
            while True:
                if len(self.accepted) + len(self.withdrawn) >= len(self.participants):
                    return "all_reported"
                possible = len(self.participants) - len(self.withdrawn)
                left = self.deadline - time.time()
                if self.enough is not None and len(self.accepted) >= min(self.enough, possible):
                    # the rest get a grace proportional to how long the needed ones took
                    now = time.time()
                    if self._enough_at is None:
                        self._enough_at = now
                    until = self._enough_at + self.enough_grace * (self._enough_at - self.opened_at)
                    if now >= until:
                        return "enough"
                    left = min(left, until - now)
                if left <= 0:
                    return "deadline"
                missing = [
                    d
                    for d in self.participants
                    if d not in self.accepted and d not in self.withdrawn
                ]
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
                withdrawn=dict(self.withdrawn),
                energy_j=dict(self.energy_j),
                effective_steps=self.sum.figures().get("effective_steps"),
            )
