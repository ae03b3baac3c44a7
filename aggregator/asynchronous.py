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
  update names its task. Intake folds a valid update into the ``Buffer`` of
  aggregator/buffer.py, the open sink (aggregator/rounds.py ``Sink``), as it folds one into a
  round in synchronous mode. It must
  answer a task this aggregator gave that device; its staleness is the version the buffer will
  be applied to minus its base version; one staler than ``rounds.max_staleness`` is rejected
  (``stale``) and counted, and the device's next task builds on the newest model. Updates go
  into a ``StalenessWeighted`` accumulator around the configured rule (the weighted mean, a
  robust rule, FedNova's normalisation).
- **Versions.** After exactly ``rounds.buffer_size`` updates the buffer is full: the next one
  goes into a new buffer while :class:`AsyncEngine` applies the full one (server optimiser),
  checkpoints, publishes the model (retained, delta downlink where configured), gives idle
  devices work on it, evaluates and writes a line of ``rounds.jsonl`` (``mode = "async"``;
  ``round`` is the buffer's number). ``rounds.rounds`` counts buffers applied. Whoever leaves,
  a version is published every ``buffer_size`` valid updates.

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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aggregator.buffer import Batch, Buffer, OpenTask
from aggregator.metrics import (
    HISTORY,
    RoundMetrics,
    append_history,
    log_personal,
    personal_figures,
    union_length,
)
from aggregator.scheduler import Assignment
from aggregator.staleness import Weighting
from edgefl.atomic import write_atomic
from edgefl.training import evaluate

if TYPE_CHECKING:
    from aggregator.service import Aggregator

log = logging.getLogger(__name__)

JOURNAL = "async-tasks.json"


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
        agg._announce(metrics, batch.number, applied, acc)
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
        log_personal(log, f"buffer {batch.number}", metrics.personal)

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
            reporters=sorted(set(devices)),
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
            # a device with two updates in one buffer: its latest figures
            personal=personal_figures(zip(devices, batch.metrics, strict=True)),
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None

