"""The aggregator service: tracks the fleet, runs rounds, keeps and publishes the global model.

A round (docs/architecture.md, synchronous mode):
 1. pick participants among online devices with recent telemetry;
 2. publish the global model (retained) and one task per participant;
 3. fold each valid update into a running weighted sum as it arrives (network thread);
 4. close when all have reported, at the deadline, or when every missing device has gone
    offline; apply the server optimiser if a quorum reported, else keep the model;
 5. evaluate, log, checkpoint.
At the end the model is exported to ONNX, checked against PyTorch, and published for deployment.

In asynchronous mode (``rounds.mode = "async"``) there are no rounds: aggregator/asynchronous.py
runs the loop instead, on the same model, strategy, broadcast and checkpoints.

One module, about 560 lines: the round loop, the close and resuming share the model, its
version and the open round. What does not (intake, the guard, metrics, checkpoint files,
broadcast, scheduling, rollout) lives in its own module.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import deploy
from aggregator.asynchronous import AsyncEngine
from aggregator.broadcast import ModelBroadcast
from aggregator.checkpoint import Checkpointer
from aggregator.intake import Intake
from aggregator.metrics import (
    HISTORY,
    RoundMetrics,
    append_history,
    log_personal,
    read_history,
    resource_metrics,
    round_metrics,
)
from aggregator.prometheus import MetricsExporter
from aggregator.registry import DeviceRegistry
from aggregator.robust import accumulator_for
from aggregator.rounds import Round, RoundResult, Sink
from aggregator.scheduler import Plan, Scheduler
from aggregator.strategies import make_strategy
from edgefl import dynsec
from edgefl.atomic import fsync_path, write_atomic
from edgefl.config import NAME_RE, AggregatorConfig, ConfigError
from edgefl.data import Dataset, load_npz
from edgefl.messages import (
    AggregatorStatus,
    Reply,
)
from edgefl.messages.control import MAX_STATUS_DEVICES, MAX_STATUS_MISSING, MAX_STATUS_REASONS
from edgefl.models import (
    build_model,
    get_weights,
    model_info,
    model_spec,
    set_weights,
    shared_spec,
)
from edgefl.mqtt import MqttLink, Will
from edgefl.topics import Topics
from edgefl.training import evaluate

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.msgpack"
OPEN_ROUND = "open-round.json"
LEDGER_ROUNDS = 1000
STATUS_EVERY_S = 0.2  # the aggregator's progress status, at most this often


class Aggregator:
    def __init__(
        self,
        cfg: AggregatorConfig,
        *,
        eval_data: Dataset | None = None,
        on_round: Callable[[RoundMetrics], None] | None = None,
    ) -> None:
        cfg.rounds.check()
        self.cfg = cfg
        self.topics = Topics(cfg.fleet)
        self.info = model_info(cfg.model.name)
        self.model = build_model(cfg.model.name, seed=cfg.seed)
        self.spec = model_spec(self.model)
        # what updates carry and rounds aggregate: the whole model, or without the layers a
        # personalisation method keeps on the devices (FedPer, FedRep), which then stay in the
        # global model as initialised
        try:
            self.update_spec = shared_spec(self.spec, cfg.personal.device_layers)
        except ValueError as e:
            raise ConfigError(f"[personal] for model {cfg.model.name}: {e}") from None
        self.weights = get_weights(self.model)
        self.version = 0
        self.checkpointed_version = 0  # the model version the newest checkpoint holds
        self.next_round = 1
        self.strategy = make_strategy(cfg.strategy)
        self.registry = DeviceRegistry()
        self.scheduler = Scheduler(cfg, self.registry, self.spec)
        self._replaced: dict[str, str] = {}  # this round's declined device -> its replacement
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = Checkpointer(self.state_dir / CHECKPOINT)
        if eval_data is None and cfg.eval_data:
            eval_data = load_npz(
                cfg.eval_data,
                features=int(np.prod(self.info.input_shape)),
                classes=self.info.num_classes,
                setting="eval_data in the aggregator's config",
            )
        self.eval_data = eval_data
        self.on_round = on_round
        self.history: list[RoundMetrics] = []
        self.ledger: list[dict[str, Any]] = []
        # the open sink intake folds into: the open round, or the buffer in asynchronous mode
        self._round: Sink | None = None
        self._round_lock = threading.Lock()
        self._last_status_at = 0.0
        self._status_lock = threading.Lock()
        self._status_timer: threading.Timer | None = None
        # what the loop waits for between rounds ("devices" before the first, "eligible" when
        # none can take part), and whom; a round or buffer says its own (Sink.waiting_on)
        self._waiting: tuple[str, list[str]] = ("", [])
        self._finished = False  # finish() said so: nothing that follows may say otherwise
        self._last_said = ("", 0.0)  # the last "waiting" line and when, not to repeat it
        self._stopping = threading.Event()
        self.intake = Intake(
            cfg,
            self.update_spec,
            self.registry,
            current_round=lambda: self._round,
            on_reply=self._on_reply,
            on_quarantine=self._quarantine,
            on_change=self._on_intake,
        )
        # what operators and tests read most, by their short names
        self.rejected, self.guard = self.intake.rejected, self.intake.guard
        self.engine = AsyncEngine(self) if cfg.rounds.mode == "async" else None
        state = self._resume()
        # a round that was open when the aggregator stopped is taken up again (in asynchronous
        # mode the open tasks and the buffer), before the link connects: the broker then
        # redelivers the updates that were not acknowledged yet
        self._reopened: Round | None = None
        if self.engine is not None:
            self.engine.restore(state.get("async") if state else None, self.ledger)
            self._round = self.engine.buffer
        else:
            self._reopened = self._reopen_round()
        self.exporter = None if not cfg.metrics.enabled else MetricsExporter(
            cfg.metrics,
            fleet=cfg.fleet,
            mode=cfg.rounds.mode,
            model=cfg.model.name,
            registry=self.registry,
            rejected=self.guard.rejected,
            status=self._status,
            history=self.history,
        )
        self.link = MqttLink(
            f"edgefl-{cfg.fleet}-aggregator",
            cfg.broker,
            will=Will(self.topics.aggregator_status, AggregatorStatus("offline").to_payload()),
            on_connect=self._on_connect,
            max_inflight=1000,
            # an update is acknowledged to the broker only once its round is checkpointed
            manual_ack=True,
        )
        self.broadcast = ModelBroadcast(
            self.link, self.topics, cfg.model.name, self.spec, cfg.codec, state_dir=self.state_dir
        )
        self.store = deploy.store_for(cfg.state_dir)
        self.rollout = deploy.Rollout(
            self.link, self.topics, self.registry, cfg.model.name, self.store, cfg.deploy
        )
        self.link.subscribe(self.topics.all_devices("status"), self.intake.status)
        self.link.subscribe(self.topics.all_devices("telemetry"), self.intake.telemetry, qos=0)
        self.link.subscribe(self.topics.all_devices("update"), self.intake.update, defer_ack=True)
        self.link.subscribe(self.topics.all_update_chunks, self.intake.update_chunk, defer_ack=True)
        self.link.subscribe(self.topics.all_devices("reply"), self.intake.reply)
        self.link.subscribe(dynsec.RESPONSE_TOPIC, self._on_dynsec_response, qos=0)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Aggregator:
        if self.exporter is not None:
            self.exporter.start()
        self.link.start(wait=True)
        self._publish_model()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake_round()
        self.checkpointer.wait_flushed()  # the last round's acknowledgements go out first
        # a finished run's status stays "finished" (retained, with its accuracy); the clean
        # disconnect below does not fire the Will either
        if self.link.connected.is_set() and not self._finished:
            info = self.link.publish(
                self.topics.aggregator_status, self._status("offline").to_payload(), retain=True
            )
            info.wait_for_publish(timeout=2.0)
        self.link.stop()
        if self.exporter is not None:
            self.exporter.stop()

    def __enter__(self) -> Aggregator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, rounds: int | None = None) -> list[RoundMetrics]:
        """Wait for the fleet, then run rounds up to ``rounds`` (default: the config's)."""
        last = rounds if rounds is not None else self.cfg.rounds.rounds
        self._rounds_total = last
        self._wait_for_devices()
        if self.engine is not None:
            self.engine.run(last)
            return self.history
        while self.next_round <= last and not self._stopping.is_set():
            self.run_round()
        return self.history

    def devices_wanted(self) -> int:
        """Devices to wait for before the first round: ``rounds.min_devices``, or (0, the
        default) every enrolled device, or one when no enrolled_devices list is set."""
        if self.cfg.rounds.min_devices > 0:
            return self.cfg.rounds.min_devices
        enrolled = self.intake.enrolled.ids()
        return max(1, len(enrolled or ()))

    def _not_online(self) -> list[str]:
        """The enrolled devices that are not online (none known without a list)."""
        enrolled = self.intake.enrolled.ids() or set()
        return sorted(d for d in enrolled if not self.registry.is_online(d))

    def _wait_for_devices(self) -> None:
        """Wait up to ``rounds.wait_for_devices_s`` for :meth:`devices_wanted` devices, saying
        (log and status) which ones it waits for."""
        want, timeout = self.devices_wanted(), self.cfg.rounds.wait_for_devices_s
        deadline = time.monotonic() + timeout
        said, online = -1.0, -1
        while not self._stopping.is_set():
            n = len(self.registry.online())
            left = deadline - time.monotonic()
            if n >= want or left <= 0:
                break
            if n != online:  # operators see each arrival
                online = n
                self._waiting = ("devices", self._not_online())
                self._publish_status(force=True)
            if time.monotonic() - said >= 10.0:
                said = time.monotonic()
                log.info(
                    "fleet %r: %d of %d devices online; waiting up to %.0f s more for %s",
                    self.cfg.fleet, n, want, left, _names(self._not_online(), "more devices"),
                )
            self.registry.wait_online(want, min(1.0, left))
        self._waiting = ("", [])
        n = len(self.registry.online())
        if n < want and not self._stopping.is_set():
            log.warning(
                "fleet %r: only %d of %d devices online after %.0f s (not online: %s); "
                "starting anyway",
                self.cfg.fleet, n, want, timeout, _names(self._not_online(), "unknown"),
            )

    def _say_waiting(self, number: int) -> None:
        """Why no device can take part in round ``number``, whom it waits for; said again only
        when that changes, or after a minute."""
        enrolled = self.intake.enrolled.ids()
        eligible = set(self.scheduler.eligible())
        why = {r.device_id: "online but not eligible (battery, stale telemetry or serve-only)"
               for r in self.registry.online() if r.device_id not in eligible}
        offline = self._not_online() if enrolled is not None else sorted(
            r.device_id for r in self.registry.records() if not r.online
        )
        self._waiting = ("eligible", sorted(set(offline) | set(why)))
        self._publish_status(force=True)
        if enrolled is None and not self.registry.online():
            whom = "any device (none is online, and no enrolled_devices list names them)"
        else:
            parts = []
            if offline:
                parts.append(f"offline: {_names(offline, '')}")
            if why:
                parts.append(f"online but not eligible (battery under the floor, no telemetry "
                             f"within {self.cfg.rounds.telemetry_max_age_s:g} s, or serve-only):"
                             f" {_names(sorted(why), '')}")
            whom = "; ".join(parts) or "a device to come online"
        line = f"round {number}: no eligible device in fleet {self.cfg.fleet!r}; waiting ({whom})"
        last, at = self._last_said
        if line != last or time.monotonic() - at >= 60.0:
            log.warning("%s", line)
            self._last_said = (line, time.monotonic())

    # -- a round --------------------------------------------------------------------------------

    def run_round(self) -> RoundMetrics | None:
        number = self.next_round
        started = time.perf_counter()
        if self._reopened is not None:
            return self._finish_reopened(started)
        plan = self.scheduler.plan(number, self.version)
        planned = time.perf_counter()
        if plan is None:
            self._say_waiting(number)
            self.registry.wait_for(lambda _records: bool(self.scheduler.eligible()), 5.0)
            return None
        self._waiting, self._last_said = ("", []), ("", 0.0)
        rnd = Round(
            number,
            self.version,
            plan.participants,
            plan.deadline,
            self.update_spec,
            enough=plan.enough,
            enough_grace=self.cfg.rounds.overcommit_grace,
            step_caps=plan.step_caps,
            accumulator=self._accumulator(),
        )
        self._replaced = {}
        # on the disk before any task goes out, flushed to it once they are out (below): the
        # tasks do not wait for two fsyncs, and a killed process loses nothing by that
        header = self.state_dir / OPEN_ROUND
        write_atomic(header, json.dumps(rnd.header()), durable=False)
        with self._round_lock:
            self._round = rnd
        self.registry.on_assigned(plan.participants)
        downlink = 0
        for device_id, task in plan.tasks.items():
            payload = task.to_payload()
            rnd.sent_at[device_id] = time.time()
            self.link.publish(self.topics.task(device_id), payload, qos=1)
            downlink += len(payload) + self.broadcast.bytes_per_device
        self._publish_status(force=True)
        rnd.opening = {"plan": planned - started, "tasks": time.perf_counter() - planned}
        fsync_path(header)
        fsync_path(header.parent)
        return self._wait_and_close(rnd, started, downlink, plan)

    def _wait_and_close(
        self, rnd: Round, started: float, downlink: int, plan: Plan | None
    ) -> RoundMetrics:
        grace = self.cfg.rounds.offline_grace_s
        closed_by = rnd.wait(lambda d: self.registry.may_return(d, grace))
        self._closing_at = self._phase_at = time.perf_counter()
        # the round's opening, then from the last accepted update to the round loop waking up
        self._phases = dict(rnd.opening)
        self._phases["wake"] = self._closing_at - rnd.started_at - rnd.last_update_s
        with self._round_lock:
            self._round = None
        result = rnd.result(closed_by)
        mean = rnd.aggregate()
        self._phase("aggregate")
        metrics = self._close(result, mean, started, downlink, plan)
        # the broker may forget the round's updates once its checkpoint is on the disk: after a
        # power cut the broker redelivers them to a model that never had them
        self.checkpointer.when_flushed(rnd.release_acks)
        return metrics

    def _reopen_round(self) -> Round | None:
        try:
            header = json.loads((self.state_dir / OPEN_ROUND).read_text())
        except (OSError, ValueError):
            return None
        if header.get("number") != self.next_round or header.get("base_version") != self.version:
            return None  # it closed before we stopped; the checkpoint has it
        rnd = Round(
            header["number"],
            header["base_version"],
            header["participants"],
            # the updates sent while we were away are redelivered as soon as we connect;
            # give them, and devices still training, a moment even if the deadline passed
            max(header["deadline"], time.time() + self.cfg.rounds.offline_grace_s),
            self.update_spec,
            enough=header.get("enough"),
            enough_grace=header.get("enough_grace", 0.0),
            step_caps={k: int(v) for k, v in header.get("step_caps", {}).items()},
            accumulator=self._accumulator(),
        )
        rnd.opened_at = header.get("opened_at", rnd.opened_at)
        self._round = rnd
        log.info("taking up round %d again (%d participants)", rnd.number, len(rnd.participants))
        return rnd

    def _finish_reopened(self, started: float) -> RoundMetrics:
        rnd, self._reopened = self._reopened, None
        self._replaced = {}
        self._publish_status(force=True)
        return self._wait_and_close(rnd, started, 0, None)

    def _phase(self, name: str) -> None:
        """Close the current phase of the round's close: seconds since the previous mark."""
        now = time.perf_counter()
        self._phases[name] = now - self._phase_at
        self._phase_at = now

    def _accumulator(self):
        return accumulator_for(self.cfg.strategy, self.update_spec)

    def _close(
        self,
        result: RoundResult,
        mean: dict[str, np.ndarray] | None,
        started: float,
        downlink: int,
        plan: Plan | None = None,
    ) -> RoundMetrics:
        rc = self.cfg.rounds
        reported = len(result.accepted)
        # a device that declined was replaced (or could not be): it does not count as asked
        asked = [d for d in result.participants if result.withdrawn.get(d) != "declined"]
        need = max(1, int(np.ceil(rc.quorum * len(asked))))
        applied = mean is not None and reported >= need
        missing = [d for d in asked if d not in result.accepted]
        # those still working when enough others had reported were cut, not late
        self.registry.on_missed(
            [
                d
                for d in missing
                if result.withdrawn.get(d) == "late"
                or (d not in result.withdrawn and result.closed_by != "enough")
            ]
        )
        self._phase("bookkeeping")
        if applied:
            assert mean is not None
            applied = self._step_model(mean, result.number)
        if not applied:
            log.warning(
                "round %d: %d of %d reported, quorum is %d; the model stays at v%d",
                result.number,
                reported,
                len(result.participants),
                need,
                self.version,
            )
        self._phase("optimiser")
        loss = acc = None
        if self.eval_data is not None:
            loss, acc = evaluate(self.model, self.eval_data)
        self._phase("evaluate")
        self.next_round = result.number + 1
        metrics = round_metrics(
            result,
            model_version=self.version,
            applied=applied,
            accuracy=acc,
            loss=loss,
            wall_s=time.perf_counter() - started,  # provisional; final at the end
            downlink_bytes=downlink,
            missing=missing,
            quarantined=sorted(self.guard.quarantined),
            **resource_metrics(result, plan, self._replaced),
        )
        self.history.append(metrics)
        self.ledger.append(
            {"round": result.number, "applied": applied, "devices": sorted(result.accepted)}
        )
        # checkpoint first, publish second: a crash in between must not leave devices holding
        # a model that a restarted aggregator knows nothing of
        self._phase("metrics")
        self._checkpoint()
        self._phase("checkpoint")
        if applied:
            self._publish_model()
        self._phase("publish_model")
        self._announce(metrics, result.number, applied, acc)
        self._phase("status")
        metrics.phases = self._phases
        # everything up to here counts towards the round's time
        metrics.close_s = time.perf_counter() - self._closing_at
        metrics.wall_s = time.perf_counter() - started
        metrics.coordination_s = metrics.wall_s - metrics.train_s_max
        append_history(self.state_dir / HISTORY, metrics)
        log.info(
            "round %d: %d/%d reported (%s), acc %s, %.3f s (slowest device %.3f s)",
            metrics.round,
            reported,
            metrics.participants,
            metrics.closed_by,
            "-" if acc is None else f"{acc:.4f}",
            metrics.wall_s,
            metrics.train_s_max,
        )
        log_personal(log, f"round {metrics.round}", metrics.personal)
        return metrics

    def _step_model(self, mean: dict[str, np.ndarray], number: int) -> bool:
        """Apply the server optimiser to the combined delta of round (or buffer) ``number``
        and make the result the next model version; False, and the model as it was, if it
        would not be finite."""
        stepped = self.strategy.step(self.weights, mean)
        if not all(np.isfinite(w).all() for w in stepped.values()):
            # the last line of defence: never publish a model that holds NaN or Inf
            log.error("round %d would make the model non-finite; its updates are discarded",
                      number)
            return False
        # the model is what devices will decode from the broadcast (aggregator/broadcast.py)
        self.weights = self.broadcast.prepare(stepped, self.version + 1, number)
        self.version += 1
        set_weights(self.model, self.weights)
        return True

    # -- publishing -------------------------------------------------------------------------------

    def _announce(
        self, metrics: RoundMetrics, number: int, applied: bool, acc: float | None
    ) -> None:
        """What follows a closed round or applied buffer in either mode: the periodic export,
        the status with the new accuracy, and the caller's callback."""
        every = self.cfg.deploy.export_every
        if every and applied and number % every == 0:
            self.export()
        self._publish_status(force=True, accuracy=acc)
        if self.exporter is not None:
            self.exporter.observe(metrics)
        if self.on_round is not None:
            self.on_round(metrics)

    def _publish_model(self) -> None:
        self.broadcast.publish(self.weights, self.version, self.next_round - 1)

    _closing_at = _phase_at = 0.0

    _rounds_total = 0

    def _status(self, state: str = "online", accuracy: float | None = None) -> AggregatorStatus:
        """Where the training stands, bounded in size whatever the fleet's (the lists are cut
        at edgefl.messages.control's MAX_STATUS_*, and what was cut is counted)."""
        rnd = self._round
        number, reported, expected = rnd.progress() if rnd else (self.next_round - 1, 0, 0)
        if self._finished:
            state = "finished"
        waiting, missing = self._waiting
        deadline = None
        if rnd is not None:
            waiting = "updates"
            missing, deadline = rnd.waiting_on()
        if state == "finished":
            waiting, missing, deadline = "nothing", [], None
        if accuracy is None:  # the newest evaluation's stands until the next one
            accuracy = next((m.accuracy for m in reversed(self.history)), None)
        devices, devices_more = self.registry.figures(MAX_STATUS_DEVICES)
        reasons = sorted((k, v) for k, v in self.rejected.items() if NAME_RE.match(k))
        return AggregatorStatus(
            state=state,
            round=number,
            model_version=self.version,
            reported=reported,
            expected=expected,
            accuracy=accuracy,
            quarantined=sorted(self.guard.quarantined),
            mode=self.cfg.rounds.mode,
            rounds=self._rounds_total or self.cfg.rounds.rounds,
            waiting_for=waiting,
            deadline=deadline,
            missing=missing[:MAX_STATUS_MISSING],
            missing_more=max(0, len(missing) - MAX_STATUS_MISSING),
            online=len(self.registry.online()),
            uplink_bytes=sum(m.uplink_bytes for m in self.history),
            downlink_bytes=sum(m.downlink_bytes for m in self.history),
            energy_j=sum(m.energy_j for m in self.history),
            rejected=dict(reasons[:MAX_STATUS_REASONS]),
            devices=devices,
            devices_more=devices_more,
        )

    def _publish_status(
        self, force: bool = False, accuracy: float | None = None, state: str = "online"
    ) -> None:
        # progress is published at most 5 times a second, so a large fleet does not flood it;
        # a change held back is published once the fifth of a second is over, or the last
        # updates of a round would never show while it waits for a straggler
        with self._status_lock:
            now = time.monotonic()
            wait = STATUS_EVERY_S - (now - self._last_status_at)
            if not force and wait > 0:
                if self._status_timer is None:
                    self._status_timer = threading.Timer(wait, self._publish_held_status)
                    self._status_timer.daemon = True
                    self._status_timer.start()
                return
            self._last_status_at = now
        self.link.publish(
            self.topics.aggregator_status, self._status(state, accuracy).to_payload(), retain=True
        )

    def _publish_held_status(self) -> None:
        with self._status_lock:
            self._status_timer = None
        if not self._stopping.is_set():
            self._publish_status(force=True)

    def finish(self) -> None:
        """Tell everyone that training is over (retained); it stays so (see :meth:`stop`)."""
        acc = self.history[-1].accuracy if self.history else None
        self._finished = True
        info = self.link.publish(
            self.topics.aggregator_status,
            self._status("finished", acc).to_payload(),
            retain=True,
        )
        info.wait_for_publish(timeout=5.0)

    # -- network thread -------------------------------------------------------------------------

    def _on_connect(self, reconnect: bool) -> None:
        self._publish_status(force=True)
        if reconnect and self.version > 0:
            self._publish_model()

    def _quarantine(self, device_id: str, reason: str) -> None:
        """Cut ``device_id`` off at the broker (the guard decided; see aggregator/guard.py)."""
        self.link.publish(dynsec.CONTROL_TOPIC, dynsec.quarantine(device_id, reason), qos=1)
        self.registry.on_quarantined(device_id)
        self._wake_round()
        self._publish_status(force=True)

    def _on_dynsec_response(self, _topic: str, payload: bytes) -> None:
        for response in dynsec.parse_response(payload):
            error = response.get("error")
            # creating a client that exists: quarantined again, the disable that follows stands
            if error and "exists" not in str(error):
                log.error("the broker's dynamic-security plugin refused %s: %s",
                          str(response.get("command"))[:40], str(error)[:200])

    def _on_intake(self) -> None:
        """A device went offline or an update was accepted: the round may be able to close,
        and operators see the progress."""
        self._wake_round()
        self._publish_status()

    def _on_reply(self, rnd: Sink, reply: Reply) -> None:
        """A participant withdrew from ``rnd``; one that declined is replaced if time allows
        (in asynchronous mode the engine gives idle devices work anyway)."""
        if reply.kind == "declined":
            self.registry.on_declined(reply.device_id, reply.reason)
            if self.engine is None:
                assert isinstance(rnd, Round)
                self._replace(rnd, reply.device_id)

    def _replace(self, rnd: Round, declined: str) -> None:
        """Ask another eligible device to do the work a participant declined, if time allows."""
        found = self.scheduler.replacement(
            rnd.number, rnd.base_version, rnd.deadline, exclude=set(rnd.participants)
        )
        if found is None:
            log.info("round %d: no replacement for %s", rnd.number, declined)
            return
        device_id, task, step_cap = found
        rnd.add_participant(device_id, step_cap)
        self.registry.on_assigned([device_id])
        self._replaced[declined] = device_id
        rnd.sent_at[device_id] = time.time()
        self.link.publish(self.topics.task(device_id), task.to_payload(), qos=1)
        log.info("round %d: %s replaces %s", rnd.number, device_id, declined)

    def _wake_round(self) -> None:
        rnd = self._round
        if rnd is not None:
            rnd.wake()

    # -- checkpoints and export ----------------------------------------------------------------

    def _checkpoint(self) -> None:
        self.checkpointer.save(
            {
                "model": self.cfg.model.name,
                "version": self.version,
                "next_round": self.next_round,
                "weights": self.weights,
                "strategy": {"name": self.strategy.name, "state": self.strategy.state()},
                "registry": self.registry.snapshot(),
                "rejected": dict(self.rejected),
                # which device's update went into which round, for the last rounds (in
                # asynchronous mode which (device, task) into which buffer)
                "ledger": self.ledger[-LEDGER_ROUNDS:],
                **({"async": self.engine.state()} if self.engine is not None else {}),
            },
        )
        self.checkpointed_version = self.version

    def _resume(self) -> dict[str, Any] | None:
        """Take up the newest checkpoint, if any; returns it."""
        state = self.checkpointer.load()
        if state is None:
            return None
        if state.get("model") != self.cfg.model.name:
            raise RuntimeError(
                f"{self.state_dir / CHECKPOINT} holds a {state.get('model')!r} model, the config "
                f"says {self.cfg.model.name!r}; use another state_dir or remove the checkpoint"
            )
        self.weights = {k: np.asarray(state["weights"][k], dtype=np.float32) for k in self.spec}
        set_weights(self.model, self.weights)
        self.version = self.checkpointed_version = int(state["version"])
        self.next_round = int(state["next_round"])
        if state["strategy"]["name"] == self.strategy.name:
            self.strategy.load_state(state["strategy"]["state"])
        self.registry.restore(state.get("registry", []))
        self.rejected.update(state.get("rejected", {}))
        self.ledger = list(state.get("ledger", []))
        self.history = read_history(self.state_dir / HISTORY, self.next_round)
        log.info("resumed from checkpoint: model v%d, next round %d", self.version, self.next_round)
        return state

    def export(self) -> dict[str, Any]:
        """Export the current model into the store (fp32 and int8 ONNX), checked against
        PyTorch; see aggregator/deploy.py."""
        return deploy.export(
            self.model,
            self.info,
            self.store,
            version=self.version,
            round_=self.next_round - 1,
            accuracy=self.history[-1].accuracy if self.history else None,
            eval_data=self.eval_data,
            int8=self.cfg.deploy.int8,
            calibration_samples=self.cfg.deploy.calibration_samples,
        )

    def deploy(self, exported: dict[str, Any]) -> dict[str, Any]:
        """Roll an exported model out to the fleet; see aggregator/deploy.py."""
        return self.rollout.publish(exported["version"])


def _names(ids: list[str], none: str, most: int = 10) -> str:
    """Device ids for a log line: the first ``most``, then how many more."""
    if not ids:
        return none
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return ", ".join(ids[:most]) + more
