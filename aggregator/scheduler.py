"""Who works in a round, and how much: the round's plan.

Eligible devices are those online with recent telemetry (a silent one is marked offline first)
whose battery is at or above ``rounds.battery_floor_pct``, or charging, or absent (mains).

``schedule.workload = "uniform"`` gives every participant the [train] workload and the [codec]
codec: every eligible device, or a seeded random sample of ``rounds.participants`` of them.

``schedule.workload = "adaptive"`` sizes each participant's work to a time budget:

1. budget: the time in which ``budget_quantile`` of the eligible devices could finish the full
   [train] workload, judged from each one's measured throughput (samples/s of past local
   training), upload time (update bytes / its link's bandwidth) and latency; at most
   ``deadline_s / (1 + deadline_slack)``. A fixed ``budget_s`` may replace it.
2. batch size: the [train] batch size, at most its samples, halved (down to
   ``min_batch_size``) while the training memory :func:`training_memory_bytes` estimates is
   more than ``memory_share`` of the free memory its telemetry reports; a device that cannot
   hold even ``min_batch_size`` sits the round out. Steps are counted in its own batch size,
   so steps x batch = samples, and time (samples over measured samples/s) and FedNova's step
   counts stay right.
3. codec: the least compressed codec of ``schedule.codecs`` whose upload fits in
   ``upload_share`` of the budget, else the most compressed one.
4. local steps: as many as its throughput allows in what the budget leaves after upload and
   latency, between ``min_work_fraction`` and ``max_work_factor`` times the [train] epochs,
   and no more than ``battery_share`` of the energy its battery holds above the floor
   (energy = CPU seconds x its power model's watts, net of its charging power when it is
   charging and says what that is: work that draws more than the charger gives drains a
   charging battery too, and then none may take it under the floor, or further under it).
   A device whose speed is not known yet gets ``probe_epochs``.
5. participants: every device that can do the minimum, or ``participants`` of them preferring
   those that worked least, then the most reliable, then those with the most battery.
6. the round closes at budget x (1 + ``deadline_slack``) (at ``deadline_s`` while probing).

In asynchronous mode (aggregator/asynchronous.py) there are no rounds: :meth:`Scheduler.assign`
gives each idle device its next task with the same eligibility, ranking, workload sizing and
codec choice, each task with a deadline of its own (the budget x (1 + ``deadline_slack``), or
``deadline_s``).

In both workloads ``rounds.overcommit`` asks for that fraction more devices than the round needs
(``Plan.enough``); the round closes once the needed number reported and the others had
another ``rounds.overcommit_grace`` x the time that took (aggregator/rounds.py). A device that
declines is replaced by :meth:`Scheduler.replacement` while the round has time left.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.registry import DEFAULT_POWER, DeviceRecord, DeviceRegistry
from edgefl.compression import Codec, ModelSpec, WireError, codec_from_config, make_codec
from edgefl.config import AggregatorConfig, ConfigError
from edgefl.messages import Task, Update, encode_compact_update
from edgefl.models import shared_spec
from edgefl.training import local_steps, samples_for_steps

log = logging.getLogger(__name__)

WORKLOADS = ("uniform", "adaptive")
# why a device whose birth says ``trains: false`` (it has no torch) gets no task
SERVE_ONLY = "serve-only (no torch)"


@dataclass
class Workload:
    """One device's share of a round."""

    steps: int  # local SGD steps, of batch_size samples each
    epochs: int  # enough epochs to hold them; the task caps the steps
    codec: Codec
    batch_size: int
    predicted_s: float | None = None  # task to update; None while its speed is unknown
    energy_j: float | None = None
    probe: bool = False


@dataclass
class Assignment:
    """One device's next task in asynchronous mode."""

    device_id: str
    task: Task
    step_cap: int  # local steps the task allows
    workload: Workload | None = None  # adaptive workloads only


@dataclass
class Plan:
    participants: list[str]
    tasks: dict[str, Task]  # one per participant
    deadline: float  # unix time
    # close the round as soon as this many reported (overcommit); None: wait for all
    enough: int | None = None
    budget_s: float | None = None  # adaptive: the time each participant's work is sized to
    step_caps: dict[str, int] = field(default_factory=dict)  # local steps each task allows
    workloads: dict[str, Workload] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # eligible but not picked: why


def training_memory_bytes(spec: ModelSpec, batch_size: int, samples: int = 0) -> int:
    """Estimated peak memory of local training (edgefl/training.py) in bytes, float32 throughout.

    - four copies of the parameters: the weights being trained, their gradients, the optimiser
      state (train_local's SGD keeps none, but FedProx's anchor or a momentum buffer is one
      copy) and the global model the delta is taken from;
    - per sample of the batch, what backward needs and produces: for every weight matrix its
      input and its output (fan-in + fan-out values), and a gradient for each of them;
    - the shuffled copy of the local data train_local makes every epoch (samples x input
      features, plus an int64 label each).

    Exact for the dense models edgefl ships; it undercounts convolutions, whose activations
    grow with the image size the shapes do not tell.
    """
    params = sum(math.prod(shape) for shape in spec.values())
    matrices = [shape for shape in spec.values() if len(shape) >= 2]
    per_sample = sum(math.prod(shape[1:]) + shape[0] for shape in matrices)
    features = math.prod(matrices[0][1:]) if matrices else 0
    return 4 * (4 * params + 2 * per_sample * batch_size) + samples * (4 * features + 8)


class Scheduler:
    def __init__(
        self, cfg: AggregatorConfig, registry: DeviceRegistry, spec: ModelSpec | None = None
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        sc = cfg.schedule
        if sc.workload not in WORKLOADS:
            raise ConfigError(f"schedule.workload must be one of {WORKLOADS}, not {sc.workload!r}")
        if not 0.0 < sc.budget_quantile <= 1.0:
            raise ConfigError("schedule.budget_quantile must be in (0, 1]")
        if cfg.rounds.overcommit < 0:
            raise ConfigError("rounds.overcommit must be >= 0")
        if sc.min_batch_size < 1 or not 0.0 < sc.memory_share <= 1.0:
            raise ConfigError("schedule.min_batch_size must be >= 1, memory_share in (0, 1]")
        # every codec built once, here, from configuration: tasks carry these values
        self.codec = codec_from_config(cfg.codec)
        self.codecs: list[Codec] = []
        for c in sc.codecs:
            try:
                self.codecs.append(make_codec(c))
            except WireError as e:
                raise ConfigError(f"schedule.codecs: {e}") from None
        self.codecs = self.codecs or [self.codec]
        self._spec = spec
        self._bytes: dict[Codec, int] = {}

    # -- eligibility ------------------------------------------------------------------------------

    def _candidates(self, left_out: dict[str, str] | None = None) -> list[DeviceRecord]:
        """The online devices that can train now; ``left_out`` collects the serve-only ones."""
        rc = self.cfg.rounds
        self.registry.sweep(rc.telemetry_max_age_s)
        out = []
        for r in self.registry.online(rc.telemetry_max_age_s):
            if not r.capabilities.get("trains", True):
                # a device without torch (device/agent.py) serves the deployed model only
                if left_out is not None:
                    left_out[r.device_id] = SERVE_ONLY
                continue
            if r.on_battery() and r.battery_pct < rc.battery_floor_pct:
                log.debug("%s: battery %.1f%% is under the floor", r.device_id, r.battery_pct)
                continue
            out.append(r)
        return out

    def eligible(self) -> list[str]:
        return [r.device_id for r in self._candidates()]

    def _enough(self, chosen: int) -> int | None:
        rc = self.cfg.rounds
        if rc.overcommit <= 0:
            return None
        if rc.participants:
            return min(rc.participants, chosen)
        return max(1, math.ceil(chosen / (1 + rc.overcommit)))

    def _want(self) -> int:
        rc = self.cfg.rounds
        return math.ceil(rc.participants * (1 + rc.overcommit)) if rc.participants else 0

    # -- the plan ---------------------------------------------------------------------------------

    def plan(self, number: int, base_version: int) -> Plan | None:
        """The round's participants and their tasks, or None if no device can take part."""
        serve_only: dict[str, str] = {}
        candidates = self._candidates(serve_only)
        if not candidates:
            return None
        if self.cfg.schedule.workload == "adaptive":
            plan = self._plan_adaptive(number, base_version, candidates)
        else:
            plan = self._plan_uniform(number, base_version, candidates)
        if plan is not None:
            plan.left_out.update(serve_only)
        return plan

    def _plan_uniform(self, number: int, base_version: int, records: list[DeviceRecord]) -> Plan:
        rc, tc = self.cfg.rounds, self.cfg.train
        chosen = [r.device_id for r in records]
        want = self._want()
        if want and len(chosen) > want:
            rng = random.Random(self.cfg.seed * 100_003 + number)
            chosen = sorted(rng.sample(chosen, want))
        deadline = time.time() + rc.deadline_s
        task = self._task(number, base_version, tc.epochs, 0, self.codec, deadline, tc.batch_size)
        by_id = {r.device_id: r for r in records}
        caps = {d: local_steps(by_id[d].samples or 0, tc.epochs, tc.batch_size) for d in chosen}
        enough = self._enough(len(chosen))
        return Plan(chosen, {d: task for d in chosen}, deadline, enough, step_caps=caps)

    def _plan_adaptive(
        self, number: int, base_version: int, records: list[DeviceRecord]
    ) -> Plan | None:
        rc, sc = self.cfg.rounds, self.cfg.schedule
        budget = self._budget(records)
        sized: dict[str, Workload] = {}
        left_out: dict[str, str] = {}
        for r in records:
            w = self.workload(r, budget)
            if isinstance(w, str):
                left_out[r.device_id] = w
            else:
                sized[r.device_id] = w
        for device_id, why in left_out.items():
            log.info("round %d: %s left out: %s", number, device_id, why)
        if not sized:
            return None
        ranked = self._rank([r for r in records if r.device_id in sized])
        want = self._want()
        chosen = sorted(r.device_id for r in (ranked[:want] if want else ranked))
        for r in ranked[len(chosen) :]:
            left_out[r.device_id] = "enough participants"
        probing = budget is None or any(sized[d].probe for d in chosen)
        round_s = rc.deadline_s if probing else min(rc.deadline_s, budget * (1 + sc.deadline_slack))
        deadline = time.time() + round_s
        tasks = {
            d: self._task(number, base_version, w.epochs, w.steps, w.codec, deadline, w.batch_size)
            for d, w in ((d, sized[d]) for d in chosen)
        }
        return Plan(
            participants=chosen,
            tasks=tasks,
            deadline=deadline,
            enough=self._enough(len(chosen)),
            budget_s=budget,
            step_caps={d: sized[d].steps for d in chosen},
            workloads={d: sized[d] for d in chosen},
            left_out=left_out,
        )

    def replacement(
        self, number: int, base_version: int, deadline: float, exclude: set[str]
    ) -> tuple[str, Task, int] | None:
        """Another eligible device for an open round, with work it can finish by ``deadline``;
        None if there is none or too little time is left."""
        left = deadline - time.time()
        records = [r for r in self._candidates() if r.device_id not in exclude]
        if left <= 0 or not records:
            return None
        tc = self.cfg.train
        for r in self._rank(records):
            n = r.samples or 0
            if self.cfg.schedule.workload == "adaptive":
                w = self.workload(r, left / (1 + self.cfg.schedule.deadline_slack))
                if isinstance(w, str):
                    continue
                task = self._task(
                    number, base_version, w.epochs, w.steps, w.codec, deadline, w.batch_size
                )
                return r.device_id, task, w.steps
            steps = local_steps(n, tc.epochs, tc.batch_size)
            predicted = self._predict(r, steps, self.codecs[0], tc.batch_size)
            if predicted is not None and predicted > left:
                continue
            task = self._task(
                number, base_version, tc.epochs, 0, self.codecs[0], deadline, tc.batch_size
            )
            return r.device_id, task, steps
        return None

    def assign(
        self, first_number: int, base_version: int, slots: int, exclude: set[str]
    ) -> tuple[list[Assignment], dict[str, str]]:
        """Asynchronous mode: tasks for up to ``slots`` eligible devices not in ``exclude``
        (busy, or held back), numbered from ``first_number``, those that worked least first;
        and the devices that can do nothing now, with the reason. The adaptive budget is judged
        over every eligible device, busy ones included, as a round's would be."""
        left_out: dict[str, str] = {}
        candidates = self._candidates(left_out)
        idle = [r for r in candidates if r.device_id not in exclude]
        if slots <= 0 or not idle:
            return [], left_out
        rc, sc, tc = self.cfg.rounds, self.cfg.schedule, self.cfg.train
        adaptive = sc.workload == "adaptive"
        budget = self._budget(candidates) if adaptive else None
        out: list[Assignment] = []
        for r in self._rank(idle):
            if len(out) >= slots:
                break
            number = first_number + len(out)
            now = time.time()
            if adaptive:
                w = self.workload(r, budget)
                if isinstance(w, str):
                    left_out[r.device_id] = w
                    continue
                probing = budget is None or w.probe
                task_s = rc.deadline_s if probing else min(
                    rc.deadline_s, budget * (1 + sc.deadline_slack)
                )
                task = self._task(
                    number, base_version, w.epochs, w.steps, w.codec, now + task_s, w.batch_size
                )
                out.append(Assignment(r.device_id, task, w.steps, w))
            else:
                task = self._task(
                    number, base_version, tc.epochs, 0, self.codec, now + rc.deadline_s,
                    tc.batch_size,
                )
                cap = local_steps(r.samples or 0, tc.epochs, tc.batch_size)
                out.append(Assignment(r.device_id, task, cap))
        return out, left_out

    # -- sizing -----------------------------------------------------------------------------------

    def workload(self, r: DeviceRecord, budget: float | None) -> Workload | str:
        """The work ``r`` can do within ``budget`` seconds, or why it can do none."""
        rc, sc, tc = self.cfg.rounds, self.cfg.schedule, self.cfg.train
        n = r.samples or 0
        if n <= 0:
            return "no local samples"
        b = self.batch_size_for(r)
        if isinstance(b, str):
            return b
        per_epoch = local_steps(n, 1, b)
        full = tc.epochs * per_epoch
        most = max(1, math.floor(full * sc.max_work_factor))
        least = max(1, math.ceil(full * sc.min_work_fraction))
        sps = r.throughput_sps
        codec = self._codec_for(r, budget if budget is not None else rc.deadline_s)
        upload_s = r.upload_s(self.payload_bytes(codec))
        probe = sps is None or budget is None
        if probe:
            steps = min(most, max(least, sc.probe_epochs * per_epoch))
        else:
            room_s = budget - upload_s - (r.latency_s or 0.0)
            steps = min(most, self._steps_in(room_s * sps, n, b))
            if steps < least:
                return f"only {max(steps, 0)} of the {least} steps it must do fit in {budget:.2f} s"
        draw = r.net_draw_w()
        if draw is not None and r.battery_pct is not None:
            compute_w, radio_w = draw
            power = r.power or DEFAULT_POWER
            above_j = (r.battery_pct - rc.battery_floor_pct) / 100 * power.battery_wh * 3600
            # spread what is left above the floor over rounds: its data keeps coming, slower;
            # under the floor (charging, but drawing more than the charger gives) nothing is
            room_j = sc.battery_share * max(0.0, above_j) - upload_s * radio_w
            speed = sps or self._slowest_sps()
            if room_j <= 0:
                steps = 0
            elif speed and compute_w > 0:
                steps = min(steps, self._steps_in(room_j / compute_w * speed, n, b))
            if steps < least:
                how = (
                    f" (charging at {r.charge_w:g} W, less than its work draws)"
                    if r.charging
                    else ""
                )
                return (
                    f"battery {r.battery_pct:.1f}%{how} leaves room for {max(steps, 0)} of the"
                    f" {least} steps it must do above the floor of {rc.battery_floor_pct:g}%"
                )
        predicted = self._predict(r, steps, codec, b)
        samples = samples_for_steps(n, b, steps)
        energy = r.energy_j_for(samples / sps, upload_s) if sps else None
        epochs = math.ceil(steps / per_epoch)
        return Workload(steps, epochs, codec, b, predicted, energy, probe)

    def batch_size_for(self, r: DeviceRecord) -> int | str:
        """The batch size ``r`` trains with (adaptive workloads), or why it can hold none.

        The [train] batch size, at most its samples (a larger batch is the same one batch); then
        halved, down to ``min_batch_size``, while training would take more than
        ``memory_share`` of the free memory it reports: a device that swaps, or whose training
        is killed for memory, helps no one. Halving keeps it simple to predict: the memory of
        the activations halves with it."""
        sc, tc = self.cfg.schedule, self.cfg.train
        n = r.samples or 0
        b = max(1, min(tc.batch_size, n))
        free_mb = r.mem_available_mb
        if free_mb is None:
            return b
        least = min(b, sc.min_batch_size)
        allowed = sc.memory_share * free_mb * 2**20
        need = training_memory_bytes(self.spec, b, n)
        while need > allowed and b > least:
            b = max(least, b // 2)
            need = training_memory_bytes(self.spec, b, n)
        if need > allowed:
            return (
                f"memory: training at batch {b} needs about {need / 2**20:.1f} MB, more than"
                f" {sc.memory_share:g} of the {free_mb:.3g} MB it has free"
            )
        return b

    def _budget(self, records: list[DeviceRecord]) -> float | None:
        rc, sc, tc = self.cfg.rounds, self.cfg.schedule, self.cfg.train
        cap = rc.deadline_s / (1 + sc.deadline_slack)
        if sc.budget_s > 0:
            return min(sc.budget_s, cap)
        times = []
        for r in records:
            n = r.samples or 0
            if r.throughput_sps and n > 0:
                # the full work's samples do not depend on the batch size (at most n)
                full = local_steps(n, tc.epochs, tc.batch_size)
                times.append(self._predict(r, full, self.codecs[0], tc.batch_size))
        if not times:
            return None
        return min(float(np.quantile(times, sc.budget_quantile)), cap)

    def _predict(
        self, r: DeviceRecord, steps: int, codec: Codec, batch_size: int
    ) -> float | None:
        """Seconds from task to update for ``steps`` local steps of ``batch_size``; None if its
        speed is unknown. Throughput is in samples/s, so a smaller batch (more steps for the
        same samples) costs the same time here; its real per-sample overhead shows in the
        measured throughput after its first round with it."""
        if not r.throughput_sps:
            return None
        samples = samples_for_steps(r.samples or 0, batch_size, steps)
        return (
            samples / r.throughput_sps
            + r.upload_s(self.payload_bytes(codec))
            + (r.latency_s or 0.0)
        )

    def _steps_in(self, samples: float, n: int, b: int) -> int:
        """The most local steps of batch ``b`` that go through at most ``samples`` samples."""
        if samples <= 0:
            return 0
        per_epoch = local_steps(n, 1, b)
        epochs, rest = divmod(samples, n)
        return int(epochs) * per_epoch + min(per_epoch - 1, int(rest // b))

    def _slowest_sps(self) -> float | None:
        known = [r.throughput_sps for r in self.registry.online() if r.throughput_sps]
        return min(known) if known else None

    def _codec_for(self, r: DeviceRecord, budget: float) -> Codec:
        for codec in self.codecs:
            if r.upload_s(self.payload_bytes(codec)) <= self.cfg.schedule.upload_share * budget:
                return codec
        return self.codecs[-1]

    @property
    def spec(self) -> ModelSpec:
        """The model's tensor shapes (built from its name when not given)."""
        if self._spec is None:
            from edgefl.models import build_model, model_spec

            self._spec = model_spec(build_model(self.cfg.model.name))
        return self._spec

    def payload_bytes(self, codec: Codec | dict[str, Any]) -> int:
        """Size of an update envelope with ``codec`` (or a spec of one), measured on a random
        delta once: the compact envelope devices send (device/updates.py), with the metrics
        they report."""
        codec = codec if isinstance(codec, Codec) else make_codec(codec)
        if codec not in self._bytes:
            rng = np.random.default_rng(0)
            # what an update carries: the layers a personalisation method keeps on the
            # devices never travel
            spec = shared_spec(self.spec, self.cfg.personal.device_layers)
            delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in spec.items()}
            now = time.time()
            metrics = {"loss": 1.0, "accuracy": 0.5, "train_s": 1.0, "cpu_s": 1.0, "steps": 100.0,
                       "samples_seen": 1000.0, "t_task": now, "t_start": now, "t_end": now + 1,
                       "battery_pct": 50.0, "charging": 0.0}
            if self.cfg.personal.method != "none":
                metrics |= {"personal_acc": 0.5, "global_acc": 0.5, "holdout_samples": 20.0}
            update = Update("x", 1, 0, 1, delta, metrics)
            payload = encode_compact_update(update, codec, spec)
            self._bytes[codec] = len(payload)
        return self._bytes[codec]

    def _rank(self, records: list[DeviceRecord]) -> list[DeviceRecord]:
        """Fairness first (fewest rounds so far), then reliability, then battery headroom."""

        def headroom(r: DeviceRecord) -> float:
            # a charging battery that work still drains has no more headroom than its level
            drained = r.net_draw_w() is not None and r.battery_pct is not None
            return r.battery_pct if drained else 1000.0

        return sorted(
            records, key=lambda r: (r.rounds_assigned, -r.reliability, -headroom(r), r.device_id)
        )

    def _task(
        self,
        number: int,
        base_version: int,
        epochs: int,
        max_steps: int,
        codec: Codec,
        deadline: float,
        batch_size: int,
    ) -> Task:
        tc = self.cfg.train
        return Task(
            round=number,
            base_version=base_version,
            epochs=epochs,
            batch_size=batch_size,
            lr=tc.lr,
            codec=codec,
            deadline=deadline,
            max_steps=max_steps,
            prox_mu=tc.prox_mu,
            personal=self.cfg.personal,
        )
