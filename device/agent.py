"""The device agent: what runs on each Pi-class device.

It announces itself (retained ``online`` birth, ``offline`` Last Will), reports telemetry, keeps
the latest global model (checked by SHA-256), trains on its local data when given a task (with
the task's epochs, step cap and batch size), and publishes the delta as an update envelope with
QoS 1. A real device times each update until its PUBACK to learn its uplink bandwidth, which its
telemetry then reports (device/profiles.py, device/telemetry.py LinkEstimator). A task that names
a [personal] method also trains the device's personal model and reports its accuracy and the
global model's on data held out of training (device/personal/trainer.py does all of that).

Everything the agent receives is checked before use; a bad message is logged and dropped. The
agent never blocks its network thread: training runs on an executor, so telemetry and
keep-alives go on while it works. Several agents can share one process (and one executor), each
with its own MQTT connection and state: that is how the local launcher simulates a fleet.

A device without torch (a serve-only install, see device/install.sh) runs the same agent: it
serves the deployed ONNX model, says ``trains: false`` in its birth so that the scheduler leaves
it out, and declines any task it is sent. torch is imported only where training needs it.

One module, about 580 lines: the agent's state (the model it holds, the task in hand, its
cancellation, the battery it spends) is shared by the network thread, the training worker and
the telemetry thread under one lock; splitting it would spread that lock's rules over modules.
What does not touch that state lives beside it (model_sync, updates, deployment, telemetry,
profiles).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device import inference
from device.deployment import DeploymentClient
from device.model_sync import ModelSync
from device.personal.serving import GlobalArchive
from device.personal.trainer import TaskTrainer
from device.profiles import make_hardware
from device.telemetry import capabilities
from device.updates import UpdateEncoder, publish_update
from edgefl import __version__
from edgefl.compression import CODECS, WireError
from edgefl.config import DeviceConfig
from edgefl.data import Dataset, load_npz
from edgefl.messages import (
    Deployment,
    GlobalModel,
    Reply,
    Status,
    Task,
    Telemetry,
)
from edgefl.models import build_model, model_info, model_spec
from edgefl.mqtt import MqttLink, Will
from edgefl.topics import Topics

log = logging.getLogger(__name__)


def missing_torch() -> str | None:
    """Why this device cannot train (torch does not import), or None if it can."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"serve-only device: torch is not installed ({e})"
    return None


def set_torch_threads(threads: int) -> None:
    """The threads torch trains with; a serve-only device has no torch to set."""
    if missing_torch() is None:
        import torch

        torch.set_num_threads(threads)


@dataclass
class AgentStats:
    tasks_received: int = 0
    updates_sent: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    train_seconds: float = 0.0
    replies: dict[str, int] = field(default_factory=dict)  # declined / late / superseded

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class DeviceAgent:
    def __init__(
        self,
        cfg: DeviceConfig,
        data: Dataset | None = None,
        *,
        executor: Executor | None = None,
        telemetry: Callable[[DeviceAgent], Telemetry] | None = None,
    ) -> None:
        self.cfg = cfg
        self.id = cfg.device_id
        self.topics = Topics(cfg.fleet)
        info = model_info(cfg.model.name)
        self.data = (
            data
            if data is not None
            else load_npz(
                cfg.data, features=int(np.prod(info.input_shape)), classes=info.num_classes
            )
        )
        # None: it can train; else why not. A serve-only device holds no torch model and
        # follows no global model (ModelSync below): it only serves the deployed one.
        self.cannot_train = missing_torch()
        self.model = build_model(cfg.model.name) if self.cannot_train is None else None
        self.spec = model_spec(self.model) if self.model is not None else {}
        self.global_model: GlobalModel | None = None
        self.stats = AgentStats()
        self._lock = threading.Lock()
        self._pending: Task | None = None  # waits for the model version it builds on
        # recent tasks, to drop QoS 1 redeliveries; (round, issued) also tells a reset
        # aggregator's new round 1 from the old one
        self._seen_tasks: deque[tuple[int, float]] = deque(maxlen=64)
        self._received_at = 0.0
        self._busy = threading.Event()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"train-{self.id}")
        # the machine, or the device a [profile] simulates: readings, pacing, energy, battery
        self.hardware = make_hardware(cfg.profile)
        self._read_telemetry = telemetry or (
            lambda agent: agent.hardware.telemetry(len(agent.data))
        )
        # one piece of work at a time; a newer task stops an older one (see _run_task)
        self._work_lock = threading.Lock()
        self._latest_task: tuple[int, float] | None = None
        self._cancel = threading.Event()
        self._measured_sps: float | None = None  # this machine's training speed
        self._last_payload_bytes = 0
        self._stop = threading.Event()
        self._telemetry_thread: threading.Thread | None = None
        self._http = None  # the optional local inference endpoint
        self.link = MqttLink(
            f"edgefl-{cfg.fleet}-{self.id}",
            cfg.broker,
            will=Will(self.topics.status(self.id), Status("offline").to_payload()),
            on_connect=self._on_connect,
        )
        self.encoder = UpdateEncoder(self.id, cfg.state_dir)
        # global models that deployments named, so that a rollback can rebuild the personal one
        self.archive = GlobalArchive(Path(cfg.state_dir) / "globals")
        # a task's training, and the personal model ([personal]; its state is loaded here)
        self.trainer = (
            TaskTrainer(self.id, cfg.model.name, self.model, self.spec, self.data, cfg.state_dir)
            if self.model is not None
            else None
        )
        self.link.subscribe(self.topics.task(self.id), self._on_task)
        # the global model: in full from model/global, or as deltas from model/delta
        self.sync = (
            ModelSync(
                self.link,
                self.topics,
                self.spec,
                cfg.model.name,
                self.id,
                held=lambda: self.global_model,
                adopt=self._on_model,
                reject=self.stats.reject,
            )
            if self.model is not None
            else None
        )
        # the deployed ONNX model: fetched, verified, served, reported in the status
        self.deployment = DeploymentClient(
            self.link,
            self.topics,
            self.id,
            cfg.model.name,
            Path(cfg.state_dir) / "models",
            health=self._local_accuracy,
            on_change=self._publish_birth,
            # a personalised device serves its own model, built on the deployment's version
            personalise=self._personalise if self.trainer is not None else None,
            check_inputs=self.data.X,
        )
        self.server = self.deployment.server

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, wait: bool = True) -> DeviceAgent:
        if self.cfg.http_port:
            from device.http import serve_http

            self._http = serve_http(self.server, self.cfg.http_port)
        self.link.start(wait=wait)
        self._telemetry_thread = threading.Thread(
            target=self._telemetry_loop, name=f"telemetry-{self.id}", daemon=True
        )
        self._telemetry_thread.start()
        return self

    def stop(self) -> None:
        """Say goodbye (retained ``offline``), then disconnect."""
        self._stop.set()
        self._cancel.set()  # work in progress (a simulated device's wait) ends now
        if self._http is not None:
            self._http.shutdown()
        if self.link.connected.is_set():
            info = self.link.publish(
                self.topics.status(self.id), Status("offline").to_payload(), qos=1, retain=True
            )
            info.wait_for_publish(timeout=2.0)
        self.link.stop()
        self.deployment.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def crash(self) -> None:
        """Drop the connection the way a power cut would: no goodbye, so the Will fires."""
        self._stop.set()
        self._cancel.set()
        self.link.abort()
        self.deployment.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> DeviceAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def model_version(self) -> int:
        return self.global_model.version if self.global_model else -1

    def personal_model(self, global_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """This device's personalised model built on ``global_weights`` (device/personal/);
        None when its tasks ask for no personalisation or it cannot train."""
        return None if self.trainer is None else self.trainer.personal_model(global_weights)

    def _personalise(self, dep: Deployment) -> dict[str, np.ndarray] | None:
        """What to serve for deployment ``dep`` (device/deployment.py asks, off the network
        thread): the personal model on its global version, which this device holds (and keeps
        in its archive) or kept when an earlier deployment named it (a rollback); None: the
        fleet's file."""
        if self.trainer is None or self.trainer.personaliser is None:
            return None
        held = self.global_model
        if held is not None and held.version == dep.version:
            self.archive.remember(held.version, held.weights)
            weights: dict[str, np.ndarray] | None = held.weights
        else:
            weights = self.archive.get(dep.version)
        return None if weights is None else self.personal_model(weights)

    # -- network thread -----------------------------------------------------------------------

    def _on_connect(self, reconnect: bool) -> None:
        self._publish_birth()

    def _publish_birth(self) -> None:
        caps = (
            capabilities()
            | {
                "samples": len(self.data),
                "model": self.cfg.model.name,
                "codecs": sorted(CODECS),
                "trains": self.cannot_train is None,
            }
            | self.hardware.capabilities()  # the power model, for the scheduler's estimates
        )
        try:
            reading = self._read_telemetry(self)
        except Exception:
            reading = None
        status = Status(
            "online",
            __version__,
            caps,
            telemetry=reading,
            serving=self.server.version,
            serving_accuracy=self.deployment.accuracy,
            serving_seq=self.deployment.serving_seq,
            serving_variant=self.deployment.serving_variant,
            previous_accuracy=self.deployment.previous_accuracy,
        )
        self.link.publish(self.topics.status(self.id), status.to_payload(), qos=1, retain=True)
        if reading is not None:
            # the retained telemetry outlives the birth, which the Will replaces: an operator
            # then still sees a device that died before its first report as it last was
            self.link.publish(
                self.topics.telemetry(self.id), reading.to_payload(), qos=0, retain=True
            )

    def _local_accuracy(self, server: inference.InferenceServer) -> float:
        """The health figure a rollout judges: the served model's accuracy on local data."""
        return float((server.predict(self.data.X) == self.data.y).mean())

    def _on_model(self, msg: GlobalModel) -> None:
        """A checked global model from ModelSync (in full, or rebuilt from a delta)."""
        with self._lock:
            # Equal: a retained copy of what we hold (re-sent on every resubscribe). Any other
            # version replaces ours, lower ones included: an aggregator that was reset starts
            # counting again, and per topic the broker delivers in order, so an older model
            # cannot overtake a newer one.
            if msg.version == self.model_version:
                return
            self.global_model = msg
            pending, passed = self._pending, None
            if pending is not None and pending.base_version == msg.version:
                self._pending = None
            elif pending is not None and pending.base_version < msg.version:
                # the model moved past the version the task builds on: that task cannot run
                self._pending, passed, pending = None, pending, None
            else:
                pending = None
        log.debug("%s: holds global model v%d", self.id, msg.version)
        if pending is not None:
            self._submit(pending)
        if passed is not None:
            self._reply(passed, "superseded", f"model v{msg.version} came instead of v"
                        f"{passed.base_version}")

    def _on_task(self, _topic: str, payload: bytes) -> None:
        try:
            task = Task.from_payload(payload)
        except WireError as e:
            self.stats.reject(e.reason)
            log.warning("%s: ignored task: %s", self.id, e)
            return
        self.stats.tasks_received += 1
        self._received_at = time.time()
        with self._lock:
            key = (task.round, task.issued)
            if key in self._seen_tasks:
                return  # QoS 1 may deliver twice
            if time.time() > task.deadline:
                log.info("%s: task for round %d arrived after its deadline", self.id, task.round)
                return
            self._seen_tasks.append(key)
            if self.sync is None:  # it cannot train: no model to wait for, no work to stop
                want = None
            else:
                # newer work supersedes whatever is still in progress (its round has closed)
                self._latest_task = key
                self._cancel.set()
                if task.base_version != self.model_version:
                    self._pending = task  # the model it builds on is on its way
                    want = task.base_version
                else:
                    want = None
        if self.cannot_train is not None:
            self._reply(task, "declined", self.cannot_train)
            return
        if want is not None:
            self.sync.want(want)
            return
        self._submit(task)

    def _submit(self, task: Task) -> None:
        try:
            self._executor.submit(self._run_task, task)
        except RuntimeError:  # executor shut down: we are stopping
            pass

    # -- worker ---------------------------------------------------------------------------------

    def _run_task(self, task: Task) -> None:
        if self._stop.is_set():
            return
        with self._work_lock:
            with self._lock:
                if self._latest_task not in (None, (task.round, task.issued)):
                    return  # a newer task came before this one started
                self._cancel = threading.Event()
            try:
                self._train_and_publish(task)
            except Exception:
                log.exception("%s: round %d failed", self.id, task.round)

    def _train_and_publish(self, task: Task) -> None:
        base = self.global_model
        if base is None or base.version != task.base_version:
            # the model moved on before the work started (in asynchronous mode versions come
            # while devices work): saying so lets the aggregator give it newer work at once
            held = "no model" if base is None else f"model v{base.version}"
            self._reply(task, "superseded", f"holds {held}; the task is for v{task.base_version}")
            return
        refusal = self._refusal(task) or self.trainer.refusal(task)
        if refusal is not None:
            self._reply(task, "declined", refusal)
            return
        self._busy.set()
        started_at = time.time()
        try:
            # plain FedAvg training, or with the task's personalisation (device/personal/)
            trained = self.trainer.train(task, base.weights)
            result = trained.result
            # a simulated device takes its own time (real wall time); None: it gave up
            paced = self._pace(task, result)
            if paced is None:
                return
            train_s, cpu_s = paced
            payload = self.encoder.encode(
                task,
                base,
                trained.weights,
                trained.samples,
                {
                    "loss": result.loss,
                    "accuracy": result.accuracy,
                    "train_s": train_s,
                    "cpu_s": cpu_s,
                    "steps": float(result.steps),
                    "samples_seen": float(result.samples_seen),
                    # unix times, for the round's timeline (on one machine, one clock)
                    "t_task": self._received_at,
                    "t_start": started_at,
                    "t_end": started_at + train_s,
                    **self._battery_metrics(),
                    **trained.metrics,
                },
                spec=trained.spec,
            )
        finally:
            self._busy.clear()
        if not self._upload(task, payload):
            return
        if time.time() > task.deadline:
            log.info(
                "%s: round %d finished after its deadline; update not sent", self.id, task.round
            )
            self._reply(task, "late", "finished after the deadline", {"cpu_s": cpu_s})
            return
        self.encoder.commit()  # its error feedback is now the device's (device/updates.py)
        # in one message, or in chunks if it is larger than the broker's packet limit; a real
        # device times it until the PUBACK of its last message, for its uplink estimate
        nbytes, sent_at = len(payload), time.monotonic()
        publish_update(
            self.link,
            self.topics,
            self.id,
            task,
            payload,
            on_acked=(lambda _s: self.hardware.observe_upload(nbytes, time.monotonic() - sent_at))
            if self.hardware.measures_link
            else None,
        )
        self.stats.updates_sent += 1
        self.stats.train_seconds += train_s
        log.debug(
            "%s: round %d trained %d steps in %.3f s, sent %d bytes",
            self.id,
            task.round,
            result.steps,
            result.seconds,
            len(payload),
        )

    # -- resources: battery guard, simulated pace, replies ---------------------------------------

    def _refusal(self, task: Task) -> str | None:
        """Why the task must be declined, or None. Whatever the aggregator believes, the agent
        never lets work take its battery under its floor, or further under it. Charging counts
        by the net drain: a simulated device knows its charging power, and work that draws
        more than that drains it too; a real device on its charger counts as not draining."""
        from edgefl.training import local_steps, samples_for_steps

        pct, charging = self.hardware.battery()
        if pct is None:
            return None
        n = len(self.data)
        steps = local_steps(n, task.epochs, task.batch_size, task.max_steps)
        samples = samples_for_steps(n, task.batch_size, steps)
        compute_s = self.hardware.predict_compute_s(samples, self._measured_sps) or 0.0
        nbytes = self._last_payload_bytes or 4 * sum(int(np.prod(s)) for s in self.spec.values())
        floor = self.cfg.battery_floor_pct
        how = " while charging" if charging else ""
        if pct < floor and self.hardware.drain_pct(1.0, 0.0) > 0:
            # already under: any work that drains it takes it further under, and this needs no
            # estimate of the work (there is none before the first task measured the speed)
            return f"battery: {pct:.1f}% is under the floor of {floor:g}% and work drains it{how}"
        need = self.hardware.drain_pct(compute_s, self.hardware.expected_upload_s(nbytes))
        if need <= 0:
            return None
        if pct - need < floor:
            return (
                f"battery: {pct:.1f}% would fall to {pct - need:.1f}%{how}, under the floor of "
                f"{floor:g}%"
            )
        return None

    def _pace(self, task: Task, result) -> tuple[float, float] | None:
        """Take as long as this hardware takes for the training just done, and pay its energy.

        Returns (train_s, cpu_s) on this hardware, or None if the agent gave up (deadline, or
        a newer task) and sent a reply saying so.
        """
        if result.seconds > 0:
            self._measured_sps = result.samples_seen / result.seconds
        wall_s, cpu_s = self.hardware.compute(
            result.samples_seen, result.seconds, result.cpu_seconds
        )
        extra = wall_s - result.seconds
        if extra > 0:
            started = time.time()
            left = task.deadline - started
            superseded = self._cancel.wait(max(0.0, min(extra, left)))
            if superseded or extra > left:
                done = result.seconds + (time.time() - started)
                share = min(1.0, done / wall_s)
                self.hardware.spend(self.hardware.energy(cpu_s * share, 0.0), done)
                self._reply(
                    task,
                    "superseded" if superseded else "late",
                    "a newer task arrived" if superseded else "training would end after deadline",
                    {
                        "cpu_s": cpu_s * share,
                        "train_s": done,
                        "samples_seen": result.samples_seen * share,
                    },
                )
                return None
        self.hardware.spend(self.hardware.energy(cpu_s, 0.0), wall_s)
        return wall_s, cpu_s

    def _upload(self, task: Task, payload: bytes) -> bool:
        """Take the time a simulated link needs for ``payload``; False if the agent gave up."""
        self._last_payload_bytes = len(payload)
        upload_s = self.hardware.upload_s(len(payload))
        if upload_s <= 0:
            return True
        started = time.time()
        left = task.deadline - started
        superseded = self._cancel.wait(max(0.0, min(upload_s, left)))
        took = time.time() - started
        self.hardware.spend(self.hardware.energy(0.0, took), took)
        if superseded or upload_s > left:
            self._reply(
                task,
                "superseded" if superseded else "late",
                "a newer task arrived" if superseded else "upload would end after the deadline",
            )
            return False
        return True

    def _battery_metrics(self) -> dict[str, float]:
        pct, charging = self.hardware.battery()
        if pct is None:
            return {}
        return {"battery_pct": pct, "charging": float(bool(charging))}

    def _reply(
        self, task: Task, kind: str, reason: str, metrics: dict[str, float] | None = None
    ) -> None:
        """Tell the aggregator that no update will come for this task, and why."""
        if self._stop.is_set():
            return  # the agent is stopping; its Will or goodbye says enough
        metrics = {**(metrics or {}), **self._battery_metrics()}
        reply = Reply(self.id, task.round, kind, reason, metrics)
        self.stats.replies[kind] = self.stats.replies.get(kind, 0) + 1
        log.info("%s: round %d %s: %s", self.id, task.round, kind, reason)
        if self.link.connected.is_set():
            self.link.publish(self.topics.reply(self.id), reply.to_payload(), qos=1)

    # -- telemetry ------------------------------------------------------------------------------

    def _publish_telemetry(self) -> None:
        try:
            t = self._read_telemetry(self)
        except Exception:
            log.exception("%s: telemetry reading failed", self.id)
            return
        # retained: an operator tool that starts now (edgefl status) sees the latest reading
        # at once, not after the next interval; the broker keeps one small message per device
        self.link.publish(self.topics.telemetry(self.id), t.to_payload(), qos=0, retain=True)

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.cfg.telemetry_interval_s):
            if self.link.connected.is_set():
                self._publish_telemetry()
