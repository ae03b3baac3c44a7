"""Asynchronous mode: buffered, staleness-aware aggregation that never waits for a round.

FedBuff (Nguyen, Malik, Zhao, Esmaeili, Jalali, Rabbat and Huba, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022), with the staleness weightings of FedAsync
(Xie, Koyejo and Gupta, 2019; aggregator/staleness.py):

- **Tasks.** Up to ``rounds.concurrency`` devices train at once (0: every eligible one). A
  device that finishes (its update accepted, or a reply: declined, late, superseded) is idle and
  gets its next task at once, built on the newest model; so does one whose task passed its
  deadline, whose device went offline, or whose agent came back with a new birth (it holds no
  task any more). The scheduler's rules apply to every task (aggregator/scheduler.py,
  :meth:`Scheduler.assign`): battery floor, telemetry age, workload sizing, codec choice. A
  device that declined waits for its next telemetry. ``rounds.max_tasks_share`` keeps one
  device to that share of a buffer while the work in progress can fill it without it.
- **Buffer.** Each task has a number of its own, carried in the task's ``round`` field, so an
  update names its task. Intake folds a valid update into :class:`Buffer`, the open sink
  (aggregator/rounds.py ``Sink``), as it folds one into a round in synchronous mode. It must
  answer a task this aggregator gave that device; its staleness is the version the buffer will
  be applied to minus its base version; one staler than ``rounds.max_staleness`` is rejected
  (``stale``) and counted, and the device's next task builds on the newest model. Updates go
  into a :class:`StalenessWeighted` accumulator around the configured rule (the weighted mean,
  a robust rule, FedNova's normalisation).
- **Versions.** After exactly ``rounds.buffer_size`` updates the buffer is full: the next one
  goes into a new buffer while :class:`AsyncEngine` applies the full one (server optimiser),
  evaluates, checkpoints, publishes the model (retained, delta downlink where configured) and
  writes a line of ``rounds.jsonl`` (``mode = "async"``; ``round`` is the buffer's number).
  ``rounds.rounds`` counts buffers applied. Whoever leaves, a version is published every
  ``buffer_size`` valid updates.

**Exactly once.** The broker's acknowledgement of every update in a buffer is held until the
checkpoint of the version that applied it is on the disk (``Checkpointer.when_flushed``), as a
round's are in synchronous mode; that checkpoint's ledger names every (device, task) that the
model holds. After a kill -9 the broker redelivers every update not acknowledged: those of
buffers not yet applied, which the restarted aggregator folds in again (the buffer's contents
need no checkpoint of their own), and those applied by a checkpoint whose acknowledgements had
not gone out, which the ledger refuses as duplicates. A task must be known to be answered, so
the open tasks, and those answered by an update whose acknowledgement is held, are written
(``async-tasks.json``) before any task goes out, and into every checkpoint; the restarted
aggregator takes them up again and does not give their devices new work over it. Task numbers
only grow, so a (device, task) pair names one piece of work across restarts.

The aggregator's session must hold ``2 x buffer_size`` unacknowledged updates (a full buffer
waiting for its checkpoint while the next one fills): Mosquitto's ``max_inflight_bytes`` as
broker/limits.py sizes it holds 64 MiB or the dense updates of ``--devices`` devices, and
edgefl's MQTT 5 link lets 65,535 messages be in flight.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aggregator.aggregation import Accumulator, Contribution
from aggregator.metrics import HISTORY, RoundMetrics, append_history, union_length
from aggregator.rounds import NO_CAP, Duplicate, NotParticipant
from aggregator.scheduler import Assignment
from aggregator.staleness import StalenessWeighted, Weighting
from edgefl.atomic import write_atomic
from edgefl.compression import WireError
from edgefl.messages import Update
from edgefl.training import evaluate

if TYPE_CHECKING:
    from aggregator.service import Aggregator

log = logging.getLogger(__name__)

JOURNAL = "async-tasks.json"
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

    def offer(self, update: Update, payload_bytes: int) -> None:
        key = (update.device_id, update.round)
        with self._lock:
            if key in self.folded:
                raise Duplicate(f"task {update.round} update already folded in")
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
            if not batch._released:
                batch._acks.append(ack)
                return
        ack()

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


class AsyncEngine:
    """The loop of asynchronous mode, in the aggregator's round thread: apply full buffers,
    give up tasks past their deadline or whose device left, hand idle devices their next task.
    It shares the model, its version, the strategy, broadcast and checkpoint with the
    :class:`aggregator.service.Aggregator` it runs in."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        rc = agg.cfg.rounds
        self.rc = rc
        self.buffer = Buffer(
            rc.buffer_size,
            rc.max_staleness,
            Weighting.from_config(rc),
            agg._accumulator,
            applies_to=agg.version,
            first_number=agg.next_round,
        )
        self.journal = agg.state_dir / JOURNAL
        self._written_seq = -1
        self._since = time.perf_counter()  # the previous version was published

    # -- state -------------------------------------------------------------------------------------

    def restore(self, state: dict[str, Any] | None, ledger: list[dict[str, Any]]) -> None:
        """After a restart: what the model holds (the ledger) and the open tasks (the newer of
        the checkpoint's and the journal's)."""
        for entry in ledger:
            for device_id, number in entry.get("updates", []):
                self.buffer.folded[(device_id, int(number))] = int(entry["round"])
        journal = _read_json(self.journal)
        candidates = [s for s in (state, journal) if s]
        if candidates:
            newest = max(candidates, key=lambda s: int(s.get("seq", 0)))
            self.buffer.restore(newest)
            # task numbers and changes only ever grow, whichever of the two is newer
            self.buffer.next_task = max(int(s.get("next_task", 1)) for s in candidates)
            self.buffer.seq = max(int(s.get("seq", 0)) for s in candidates)
            if self.buffer.tasks:
                log.info("taking up %d tasks again", len(self.buffer.tasks))
        self.buffer.reopen(self.agg.next_round, self.agg.version)

    def state(self) -> dict[str, Any]:
        return self.buffer.state()

    def _write_journal(self) -> None:
        """The tasks as they stand, if they changed. Not flushed: a killed process loses
        nothing by that (the page cache outlives it); after a power cut the checkpoint, flushed
        with every version, holds the tasks as they were then (and Mosquitto, saving every
        autosave_interval, may have lost the newer updates too)."""
        state = self.buffer.state()
        if state["seq"] == self._written_seq:
            return
        write_atomic(self.journal, json.dumps(state), durable=False)
        self._written_seq = state["seq"]

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, last: int) -> None:
        """Until ``last`` buffers have been applied, or the aggregator stops."""
        agg = self.agg
        self._since = time.perf_counter()
        log.info(
            "asynchronous mode: buffers of %d updates, %s devices at once, staleness %s",
            self.rc.buffer_size,
            self.rc.concurrency or "all eligible",
            self.rc.staleness,
        )
        while agg.next_round <= last and not agg._stopping.is_set():
            batch = self.buffer.take_ready()
            if batch is not None:
                self._apply(batch)
                continue
            self._give_up()
            self._fill()
            self._write_journal()
            self.buffer.wait(0.2)
        self._write_journal()

    def _give_up(self) -> None:
        """Free the places of tasks past their deadline, of devices gone for longer than
        ``offline_grace_s``, and of agents that came back with a new birth."""
        registry, now = self.agg.registry, time.time()
        lost, late = [], []
        for t in self.buffer.active():
            rec = registry.get(t.device_id)
            if now > t.deadline:
                lost.append(t.number)
                late.append(t.device_id)
            elif not registry.may_return(t.device_id, self.rc.offline_grace_s):
                lost.append(t.number)
            elif rec is not None and not t.restored and rec.online_since > t.sent_at:
                lost.append(t.number)  # it restarted, or reconnected after its Will
        gone = self.buffer.give_up(lost) if lost else []
        missed = [d for d in gone if d in late] + self.buffer.take_missed()
        if missed:
            registry.on_missed(missed)
        if gone:
            log.info("tasks given up: %s", ", ".join(gone))

    def _fill(self) -> None:
        """Give idle eligible devices their next task, up to ``concurrency`` at once."""
        agg, rc = self.agg, self.rc
        active = self.buffer.active()
        busy = {t.device_id for t in active}
        slots = (rc.concurrency or len(agg.registry.online()) or 1) - len(active)
        if slots <= 0:
            return
        # a device that declined waits for telemetry newer than its decline
        held = set(busy)
        for device_id, at in list(self.buffer.declined_at.items()):
            rec = agg.registry.get(device_id)
            if rec is None or rec.telemetry_at <= at:
                held.add(device_id)
        # one device's share of a buffer, while the work in progress can fill it without it
        cap = max(1, math.ceil(rc.max_tasks_share * rc.buffer_size))
        over = {d for d, n in self.buffer.in_buffer().items() if n >= cap}
        first = self.buffer.next_task
        got, left_out = agg.scheduler.assign(first, agg.version, slots, held | over)
        if over - busy and len(got) < slots and self.buffer.pending() + len(got) < rc.buffer_size:
            more, _ = agg.scheduler.assign(
                first + len(got), agg.version, slots - len(got),
                held | {a.device_id for a in got},
            )
            got += more
        self.buffer.note_left_out({d: why for d, why in left_out.items() if d not in busy})
        if got:
            self._send(got)

    def _send(self, got: list[Assignment]) -> None:
        agg = self.agg
        now = time.time()
        tasks = [
            OpenTask(a.task.round, a.device_id, a.task.base_version, a.step_cap, now,
                     a.task.deadline)
            for a in got
        ]
        payloads = {a.device_id: a.task.to_payload() for a in got}
        workloads = {
            a.device_id: {
                "steps": a.workload.steps,
                "batch_size": a.workload.batch_size,
                "codec": a.workload.codec.name,
                "predicted_s": a.workload.predicted_s,
                "probe": a.workload.probe,
            }
            for a in got
            if a.workload is not None
        }
        self.buffer.add(tasks, sum(len(p) for p in payloads.values()), workloads)
        # written before any goes out: a restarted aggregator must know every task that an
        # update it is redelivered can answer
        self._write_journal()
        agg.registry.on_assigned([a.device_id for a in got])
        for a in got:
            agg.link.publish(agg.topics.task(a.device_id), payloads[a.device_id], qos=1)
        log.debug("tasks %s", ", ".join(f"{a.task.round}->{a.device_id}" for a in got))

    # -- a full buffer -----------------------------------------------------------------------------

    def _apply(self, batch: Batch) -> None:
        """Make the next model version of a full buffer, checkpoint it, publish it, give idle
        devices work on it, and only then evaluate and report: devices need not wait for that."""
        agg = self.agg
        closing = mark = time.perf_counter()
        phases: dict[str, float] = {}

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = now - mark
            mark = now

        mean = batch.acc.aggregate()
        phase("aggregate")
        applied = mean is not None and agg._step_model(mean, batch.number)
        if not applied:
            self.buffer.rebase(agg.version)
        phase("optimiser")
        agg.next_round = batch.number + 1
        agg.ledger.append(
            {
                "round": batch.number,
                "version": agg.version,
                "applied": applied,
                "updates": [[d, n] for d, n in batch.updates],
            }
        )
        # checkpoint first, publish second (as a round's close): a crash in between must not
        # leave devices holding a model that a restarted aggregator knows nothing of
        agg._checkpoint()
        phase("checkpoint")
        if applied:
            agg._publish_model()
            online = sum(1 for r in agg.registry.online() if r.capabilities.get("trains", True))
            self.buffer.add_downlink(agg.broadcast.bytes_per_device * online)
        # the broker may forget these updates once the checkpoint that holds them is flushed
        agg.checkpointer.when_flushed(lambda: self.buffer.release(batch))
        phase("publish_model")
        self._fill()
        phase("tasks")
        loss = acc = None
        if agg.eval_data is not None:
            loss, acc = evaluate(agg.model, agg.eval_data)
        phase("evaluate")
        metrics = self._metrics(batch, applied, acc, loss)
        agg.history.append(metrics)
        every = agg.cfg.deploy.export_every
        if every and applied and batch.number % every == 0:
            agg.export()
        agg._publish_status(force=True, accuracy=acc)
        if agg.on_round is not None:
            agg.on_round(metrics)
        phase("status")
        now = time.perf_counter()
        metrics.phases = phases
        metrics.close_s = now - closing
        metrics.wall_s = now - self._since
        metrics.coordination_s = max(0.0, metrics.wall_s - metrics.train_s_max)
        self._since = now
        append_history(agg.state_dir / HISTORY, metrics)
        log.info(
            "buffer %d: %d updates (staleness %.1f on average), model v%d, acc %s, %.3f s,"
            " %d devices training",
            batch.number,
            batch.count,
            batch.acc.figures().get("staleness_mean", 0.0),
            agg.version,
            "-" if acc is None else f"{acc:.4f}",
            metrics.wall_s,
            metrics.buffer["training"],
        )

    def _metrics(
        self, batch: Batch, applied: bool, acc: float | None, loss: float | None
    ) -> RoundMetrics:
        """A buffer's line of rounds.jsonl; ``wall_s`` and the phases are filled in last."""
        agg = self.agg
        train_s = max((m.get("train_s", 0.0) for m in batch.metrics), default=0.0)
        devices = [d for d, _ in batch.updates]
        return RoundMetrics(
            round=batch.number,
            model_version=agg.version,
            # the tasks that ended in this buffer's time: with an update, lost, or declined
            participants=batch.count + len(batch.missing)
            + sum(k == "declined" for k in batch.withdrawn.values()),
            reported=batch.count,
            closed_by="buffer_full",
            applied=applied,
            accuracy=acc,
            loss=loss,
            wall_s=0.0,
            train_s_max=train_s,
            coordination_s=0.0,
            uplink_bytes=batch.uplink_bytes,
            downlink_bytes=batch.downlink_bytes,
            samples=batch.samples,
            last_update_s=max(0.0, batch.filled_at - self._since),
            compute_span_s=union_length(
                [(m["t_start"], m["t_end"]) for m in batch.metrics if "t_end" in m]
            ),
            rejected=dict(batch.rejected),
            missing=list(batch.missing),
            withdrawn=dict(batch.withdrawn),
            workloads=dict(batch.workloads),
            left_out=dict(batch.left_out),
            energy_j=sum(batch.energy.values()),
            energy_by_device=dict(batch.energy),
            battery_pct={
                d: m["battery_pct"]
                for d, m in zip(devices, batch.metrics, strict=True)
                if "battery_pct" in m
            },
            effective_steps=batch.acc.figures().get("effective_steps"),
            quarantined=sorted(agg.guard.quarantined),
            mode="async",
            buffer={
                "size": self.rc.buffer_size,
                "staleness": {str(s): n for s, n in sorted(batch.acc.staleness.items())},
                "training": len(self.buffer.active()),
                "late_updates": batch.late,
            },
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None

