"""The open sink of asynchronous mode: the buffer intake folds updates into, and the tasks
those updates must answer (aggregator/asynchronous.py runs the loop around it).

:class:`Buffer` is to asynchronous mode what aggregator/rounds.py's ``Round`` is to a round:
the ``Sink`` intake offers a validated update to. An update must answer the task this
aggregator gave that device (its number travels in the task's ``round`` field), once; its
staleness is the version the buffer will be applied to minus its base version, and one staler
than ``max_staleness`` is rejected (``stale``). It is folded into a :class:`StalenessWeighted`
accumulator around the configured rule. After exactly ``size`` updates the buffer is full and
the next update starts a new one at once; the engine takes full buffers with
:meth:`Buffer.take_ready`. Each buffer (:class:`Batch`) holds the broker's acknowledgements of
its updates until :meth:`Buffer.release`, after the checkpoint of the version that applied it
is flushed; until then the tasks its updates answered stay in :meth:`Buffer.state`, so that a
restarted aggregator knows them when the broker redelivers those updates.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from aggregator.aggregation import Accumulator, Contribution
from aggregator.rounds import NO_CAP, Duplicate, NotParticipant
from aggregator.staleness import StalenessWeighted, Weighting
from edgefl.compression import WireError
from edgefl.messages import Update

# tasks remembered per device: it works on one at a time, but an older one (past its deadline,
# or from before the device reconnected) may still deliver, and then counts
KEEP_PER_DEVICE = 4
# buffers whose (device, task) pairs are remembered, to name a redelivered update a duplicate
# (as many as the checkpoint's ledger keeps); an older one finds its task gone anyway
REMEMBERED_BUFFERS = 1000


@dataclass
class OpenTask:
    """A task given to a device: open until answered; once answered by an update, kept (in
    its buffer) until that update's acknowledgement has gone out."""

    number: int
    device_id: str
    base_version: int
    step_cap: int
    sent_at: float  # unix time
    deadline: float  # unix time
    active: bool = True  # holds one of the ``concurrency`` places
    restored: bool = False  # given before the aggregator restarted


class Batch:
    """One buffer: the updates folded in, what the time until it was full saw, and the
    acknowledgements it holds for the broker."""

    def __init__(self, number: int, acc: StalenessWeighted) -> None:
        self.number = number  # the buffer's number: ``round`` in rounds.jsonl
        self.acc = acc
        self.updates: list[tuple[str, int]] = []  # (device, task), in the order folded in
        self.tasks: list[OpenTask] = []  # the tasks they answered
        self.metrics: list[dict[str, float]] = []
        self.samples = 0
        self.uplink_bytes = 0
        self.late = 0  # updates for tasks already given up for lost (deadline, gone)
        self.filled_at = 0.0  # perf_counter when the last update came
        self.energy: dict[str, float] = {}
        self.rejected: Counter[str] = Counter()
        self.withdrawn: dict[str, str] = {}
        self.missing: list[str] = []  # devices whose task was lost: deadline, left, restarted
        self.workloads: dict[str, dict[str, Any]] = {}
        self.downlink_bytes = 0
        self.left_out: dict[str, str] = {}
        self._acks: list[Callable[[], None]] = []
        self._released = False

    @property
    def count(self) -> int:
        return len(self.updates)


class Buffer:
    """The open sink of asynchronous mode (aggregator/rounds.py ``Sink``), and the open tasks
    its updates must answer. The network thread folds into it; :class:`AsyncEngine` hands out
    tasks and takes full buffers. Thread-safe."""

    def __init__(
        self,
        size: int,
        max_staleness: int,
        weighting: Weighting,
        make_rule: Callable[[], Accumulator],
        applies_to: int,
        first_number: int,
    ) -> None:
        self.size = size
        self.max_staleness = max_staleness
        self.weighting = weighting
        self._make_rule = make_rule
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self._dirty = False
        self.tasks: dict[int, OpenTask] = {}
        self.next_task = 1
        self.seq = 0  # counts changes to the tasks, so the newer of journal and checkpoint wins
        self.sent_at: dict[str, float] = {}
        # (device, task) -> the buffer it went into, for the last REMEMBERED_BUFFERS buffers
        self.folded: dict[tuple[str, int], int] = {}
        self.declined_at: dict[str, float] = {}
        self.missed: list[str] = []  # late replies, for the registry (engine thread)
        # buffers whose acknowledgements have not gone out: the open one, full ones waiting for
        # the engine, applied ones waiting for their checkpoint's flush
        self._holding: list[Batch] = []
        self.current = self._batch(first_number, applies_to)
        self.ready: deque[Batch] = deque()
        self._last: Batch = self.current

    def _batch(self, number: int, applies_to: int) -> Batch:
        batch = Batch(number, StalenessWeighted(self._make_rule(), self.weighting, applies_to))
        self._holding.append(batch)
        return batch

    # -- the sink: network thread --------------------------------------------------------------

    def expected(self) -> tuple[int | None, int | None]:
        return None, None  # every update names its own task, checked in offer()

    def admits(self, device_id: str, round_: int, base_version: int) -> tuple[str, str] | None:
        with self._lock:
            task = self.tasks.get(round_)
            if task is None or task.device_id != device_id:
                return "not_participant", f"no open task {round_} for it"
            if base_version != task.base_version:
                return "base_version", (
                    f"update against model v{base_version}, task {round_} builds on "
                    f"v{task.base_version}"
                )
        return None  # staleness is judged when the whole update is offered

    def is_open(self, round_: int) -> bool:
        with self._lock:
            return round_ in self.tasks

    def offer(self, update: Update, payload_bytes: int) -> None:
        key = (update.device_id, update.round)
        with self._lock:
            if key in self.folded:
                raise Duplicate(
                    f"task {update.round} update already folded in", self._holder(self.folded[key])
                )
            task = self.tasks.get(update.round)
            if task is None or task.device_id != update.device_id:
                raise NotParticipant(f"no open task {update.round} for it")
            if update.base_version != task.base_version:
                raise WireError(
                    "base_version",
                    f"update against model v{update.base_version}, task {task.number} builds "
                    f"on v{task.base_version}",
                )
            batch = self.current
            staleness = batch.acc.applies_to - task.base_version
            self._last = batch
            if staleness > self.max_staleness:
                self._end(task)
                self._touch()  # its device is free for work on the newest model
                raise WireError(
                    "stale",
                    f"built on model v{task.base_version}, {staleness} versions before the one "
                    f"it would join (rounds.max_staleness is {self.max_staleness})",
                )
            cap = task.step_cap or NO_CAP
            steps = min(max(update.metrics.get("steps", cap), 1.0), max(cap, 1))
            batch.acc.fold(
                Contribution(
                    update.device_id,
                    update.delta,
                    float(update.num_samples),
                    float(steps),
                    task.base_version,
                )
            )
            if not task.active:
                batch.late += 1
            self._end(task)
            self.folded[key] = batch.number
            batch.updates.append(key)
            batch.tasks.append(task)
            batch.metrics.append(update.metrics)
            batch.samples += update.num_samples
            batch.uplink_bytes += payload_bytes
            batch.filled_at = time.perf_counter()
            if batch.count >= self.size:
                # the next update goes into a new buffer at once: nothing waits for the model
                self.ready.append(batch)
                self.current = self._batch(batch.number + 1, batch.acc.applies_to + 1)
            self._touch()

    def hold_ack(self, ack: Callable[[], None]) -> None:
        """The acknowledgement of the update just folded in: into the buffer it went into
        (a buffer released already is on the disk: the ack goes out at once)."""
        with self._lock:
            batch = self._last
        self._hold_in(batch, ack)

    def _hold_in(self, batch: Batch, ack: Callable[[], None]) -> None:
        with self._lock:
            if not batch._released:
                batch._acks.append(ack)
                return
        ack()

    def _holder(self, number: int) -> Callable[[Callable[[], None]], None] | None:
        """Where a redelivered copy's acknowledgement waits: with the acknowledgements of the
        buffer ``number`` that holds the original, if they have not gone out (lock held)."""
        for batch in self._holding:
            if batch.number == number:
                return lambda ack: self._hold_in(batch, ack)
        return None

    def release(self, batch: Batch) -> int:
        """Acknowledge ``batch``'s updates to the broker (after its checkpoint is flushed)."""
        with self._lock:
            batch._released = True
            acks, batch._acks = batch._acks, []
            if batch in self._holding:
                self._holding.remove(batch)
                self.seq += 1
            # memory stays bounded however long the service runs
            oldest = batch.number - REMEMBERED_BUFFERS
            if len(self.folded) > REMEMBERED_BUFFERS * self.size:
                self.folded = {k: n for k, n in self.folded.items() if n > oldest}
        for ack in acks:
            ack()
        return len(acks)

    def withdraw(self, device_id: str, kind: str, round_: int | None = None) -> bool:
        with self._lock:
            task = self.tasks.get(round_) if round_ is not None else None
            if task is None or task.device_id != device_id:
                return False
            batch = self._last = self.current
            if task.active and kind in ("late", "superseded"):
                batch.missing.append(device_id)
                if kind == "late":
                    self.missed.append(device_id)
            batch.withdrawn[device_id] = kind
            if kind == "declined":
                self.declined_at[device_id] = time.time()
            self._end(task)
            self._touch()
            return True

    def count_rejection(self, reason: str) -> None:
        with self._lock:
            self.current.rejected[reason] += 1

    def add_energy(self, device_id: str, joules: float) -> None:
        with self._lock:
            energy = self._last.energy
            energy[device_id] = energy.get(device_id, 0.0) + joules

    def progress(self) -> tuple[int, int, int]:
        with self._lock:
            return self.current.number, self.current.count, self.size

    def wake(self) -> None:
        with self._lock:
            self._touch()

    def _touch(self) -> None:
        self._dirty = True
        self.changed.notify_all()

    def _end(self, task: OpenTask) -> None:
        self.tasks.pop(task.number, None)
        self.seq += 1

    # -- the engine's side ---------------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Until an update, a reply or a wake-up came, or ``timeout`` passed."""
        with self._lock:
            if not self._dirty and not self.ready:
                self.changed.wait(timeout)
            self._dirty = False

    def take_ready(self) -> Batch | None:
        with self._lock:
            return self.ready.popleft() if self.ready else None

    def rebase(self, applies_to: int) -> None:
        """A full buffer was not applied (it would have made the model non-finite): the open
        one joins the model as it is."""
        with self._lock:
            self.current.acc.applies_to = applies_to + len(self.ready)

    def waiting_on(self) -> tuple[list[str], float | None]:
        return sorted({t.device_id for t in self.active()}), None

    def active(self) -> list[OpenTask]:
        with self._lock:
            return [t for t in self.tasks.values() if t.active]

    def in_buffer(self) -> Counter[str]:
        """Updates per device in the open buffer."""
        with self._lock:
            return Counter(d for d, _ in self.current.updates)

    def pending(self) -> int:
        """Updates in the open buffer plus work in progress."""
        with self._lock:
            return self.current.count + sum(t.active for t in self.tasks.values())

    def give_up(self, numbers: list[int]) -> list[str]:
        """Free the places of tasks given up for lost (they still count if they deliver);
        the devices whose tasks these were."""
        out = []
        with self._lock:
            for n in numbers:
                task = self.tasks.get(n)
                if task is not None and task.active:
                    task.active = False
                    self.current.missing.append(task.device_id)
                    out.append(task.device_id)
            if out:
                self.seq += 1
        return out

    def add(self, tasks: list[OpenTask], downlink: int, workloads: dict[str, dict]) -> None:
        with self._lock:
            for t in tasks:
                # a device's new task supersedes its older ones, which stay answerable a while
                older = sorted(n for n, o in self.tasks.items() if o.device_id == t.device_id)
                for n in older[: max(0, len(older) - KEEP_PER_DEVICE + 1)]:
                    del self.tasks[n]
                for n in older:
                    if n in self.tasks:
                        self.tasks[n].active = False
                self.tasks[t.number] = t
                self.sent_at[t.device_id] = t.sent_at
                self.declined_at.pop(t.device_id, None)
                self.next_task = max(self.next_task, t.number + 1)
            self.seq += 1
            self.current.downlink_bytes += downlink
            self.current.workloads.update(workloads)

    def take_missed(self) -> list[str]:
        with self._lock:
            missed, self.missed = self.missed, []
            return missed

    def add_downlink(self, nbytes: int) -> None:
        with self._lock:
            self.current.downlink_bytes += nbytes

    def note_left_out(self, left_out: dict[str, str]) -> None:
        with self._lock:
            self.current.left_out.update(left_out)

    def state(self) -> dict[str, Any]:
        """For the journal and the checkpoint: the open tasks, and those answered by an update
        whose acknowledgement is still held (after a restart the broker redelivers it, and it
        must find its task)."""
        with self._lock:
            answered = [
                asdict(t) | {"active": False} for b in self._holding for t in b.tasks
            ]
            return {
                "seq": self.seq,
                "next_task": self.next_task,
                "tasks": [asdict(t) for t in self.tasks.values()] + answered,
            }

    def reopen(self, number: int, applies_to: int) -> None:
        """Start over with an empty buffer ``number`` for model ``applies_to`` (a resumed
        checkpoint's); nothing may have been folded in yet."""
        with self._lock:
            assert not self.current.updates and not self.ready
            self._holding.remove(self.current)
            self.current = self._last = self._batch(number, applies_to)

    def restore(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.seq = int(state.get("seq", 0))
            self.next_task = max(self.next_task, int(state.get("next_task", 1)))
            for raw in state.get("tasks", []):
                task = OpenTask(**{**raw, "restored": True})
                if (task.device_id, task.number) not in self.folded:
                    self.tasks[task.number] = task
                    self.sent_at[task.device_id] = task.sent_at
