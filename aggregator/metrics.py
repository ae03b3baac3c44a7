"""What a round's close reports: :class:`RoundMetrics`, one line of ``rounds.jsonl`` each (in
asynchronous mode one per buffer applied, ``mode = "async"``), and the figures derived from a
round's result (where the time went, energy, workloads)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.rounds import RoundResult
from aggregator.scheduler import Plan


@dataclass
class RoundMetrics:
    round: int
    model_version: int
    participants: int
    reported: int
    closed_by: str
    applied: bool
    accuracy: float | None
    loss: float | None
    wall_s: float
    train_s_max: float  # the slowest reporting device's training time
    coordination_s: float  # wall time minus the slowest device's training time
    uplink_bytes: int
    downlink_bytes: int
    samples: int
    # where the time went: opening to the last accepted update, and closing (optimiser,
    # evaluation, publishing the model, checkpoint)
    last_update_s: float = 0.0
    close_s: float = 0.0
    # union of the devices' training intervals: the time at least one device was computing
    compute_span_s: float = 0.0
    timeline: dict[str, float] = field(default_factory=dict)
    # the aggregator's own time, phase by phase (seconds): planning and sending tasks; from the
    # last accepted update to waking up; combining, optimiser, evaluation, metrics, checkpoint,
    # publishing the model and the status
    phases: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    # the devices whose updates it took, by id (the run report's participation chart)
    reporters: list[str] = field(default_factory=list)
    # resource-aware rounds (aggregator/scheduler.py): devices that replied instead of
    # updating ("declined" / "late" / "superseded"), replacements (declined -> replacement),
    # the time budget and each participant's workload, and who was left out and why
    withdrawn: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    budget_s: float | None = None
    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    # energy estimate per device for this round's work (CPU time x its power model's watts,
    # plus upload time x radio watts), their sum, and battery levels the devices reported
    energy_j: float = 0.0
    energy_by_device: dict[str, float] = field(default_factory=dict)
    battery_pct: dict[str, float] = field(default_factory=dict)
    effective_steps: float | None = None  # FedNova's tau_eff
    # devices cut off at the broker for flooding or invalid messages (aggregator/guard.py)
    quarantined: list[str] = field(default_factory=list)
    # "async" (aggregator/asynchronous.py): a record per buffer applied, ``round`` its number;
    # ``buffer``: its size, its updates by staleness (versions, as strings), the devices training
    # when it was applied, and updates that came after their task was given up for lost
    mode: str = "sync"
    buffer: dict[str, Any] = field(default_factory=dict)
    # personalised models ([personal], device/personal/): what the devices that reported said
    # of their held-out split, {"devices": {id: {personal_acc, global_acc, holdout_samples}},
    # "personal_acc": {mean, p10, min, n}, "global_acc": {...}}; empty when none did
    personal: dict[str, Any] = field(default_factory=dict)


HISTORY = "rounds.jsonl"
PERSONAL_METRICS = ("personal_acc", "global_acc", "holdout_samples")


def round_metrics(
    result: RoundResult,
    *,
    model_version: int,
    applied: bool,
    accuracy: float | None,
    loss: float | None,
    wall_s: float,
    downlink_bytes: int,
    missing: list[str],
    quarantined: list[str],
    **resources: Any,
) -> RoundMetrics:
    """A closed round's figures; ``resources`` as :func:`resource_metrics` gives them."""
    train_s = [m.get("train_s", 0.0) for m in result.accepted.values()]
    return RoundMetrics(
        round=result.number,
        model_version=model_version,
        participants=len(result.participants),
        reported=len(result.accepted),
        closed_by=result.closed_by,
        applied=applied,
        accuracy=accuracy,
        loss=loss,
        wall_s=wall_s,
        train_s_max=max(train_s, default=0.0),
        coordination_s=wall_s - max(train_s, default=0.0),
        uplink_bytes=result.uplink_bytes,
        downlink_bytes=downlink_bytes,
        samples=result.samples,
        last_update_s=result.last_update_s,
        compute_span_s=union_length(
            [(m["t_start"], m["t_end"]) for m in result.accepted.values() if "t_end" in m]
        ),
        timeline=timeline(result),
        rejected=dict(result.rejected),
        missing=missing,
        reporters=sorted(result.accepted),
        quarantined=quarantined,
        personal=personal_figures(result.accepted.items()),
        **resources,
    )


def append_history(path: Path, metrics: RoundMetrics) -> None:
    """One line of the round history (``rounds.jsonl``), which a restart reads back."""
    with path.open("a") as f:
        f.write(json.dumps(asdict(metrics)) + "\n")


def read_history(path: Path, next_round: int) -> list[RoundMetrics]:
    """The metrics of the rounds before a restart, from rounds.jsonl."""
    out: list[RoundMetrics] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    known = {f.name for f in fields(RoundMetrics)}
    for line in lines:
        try:
            m = json.loads(line)
            if m["round"] < next_round:
                out.append(RoundMetrics(**{k: v for k, v in m.items() if k in known}))
        except (ValueError, KeyError, TypeError):
            continue
    # a round taken up again after a restart is recorded once: the last record wins
    by_round = {m.round: m for m in out}
    return [by_round[r] for r in sorted(by_round)]


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def resource_metrics(
    result: RoundResult, plan: Plan | None, replaced: dict[str, str]
) -> dict[str, Any]:
    """The round's figures from aggregator/scheduler.py's plan and the devices' replies."""
    workloads = {}
    for device_id, w in (plan.workloads if plan else {}).items():
        workloads[device_id] = {
            "steps": w.steps,
            "batch_size": w.batch_size,
            "codec": w.codec.name,
            "predicted_s": w.predicted_s,
            "probe": w.probe,
        }
    return {
        "withdrawn": dict(result.withdrawn),
        "replaced": dict(replaced),
        "budget_s": plan.budget_s if plan else None,
        "workloads": workloads,
        "left_out": dict(plan.left_out) if plan else {},
        "energy_j": sum(result.energy_j.values()),
        "energy_by_device": dict(result.energy_j),
        "battery_pct": {
            d: m["battery_pct"] for d, m in result.accepted.items() if "battery_pct" in m
        },
        "effective_steps": result.effective_steps,
    }


def timeline(result: RoundResult) -> dict[str, float]:
    """When, after the round opened, tasks arrived and training started and ended (seconds)."""
    out: dict[str, float] = {}
    for key in ("t_task", "t_start", "t_end"):
        times = [m[key] - result.opened_at for m in result.accepted.values() if key in m]
        if times:
            out[f"{key[2:]}_first"] = min(times)
            out[f"{key[2:]}_last"] = max(times)
    return out


def personal_figures(reports: Iterable[tuple[str, Mapping[str, float]]]) -> dict[str, Any]:
    """The personal and global accuracies that devices reported (each on its own held-out
    split), device by device, and their distribution across the devices: mean, 10th
    percentile, the worst, how many. Empty if no device reported them."""
    devices = {
        device_id: {k: float(m[k]) for k in PERSONAL_METRICS}
        for device_id, m in reports
        if all(k in m for k in PERSONAL_METRICS)
    }
    if not devices:
        return {}
    out: dict[str, Any] = {"devices": devices}
    for key in ("personal_acc", "global_acc"):
        values = np.array([d[key] for d in devices.values()], dtype=np.float64)
        out[key] = {
            "mean": float(values.mean()),
            "p10": float(np.percentile(values, 10)),
            "min": float(values.min()),
            "n": len(values),
        }
    return out


def log_personal(log: logging.Logger, what: str, personal: Mapping[str, Any]) -> None:
    """One line for a round (or buffer) whose devices reported personal accuracies."""
    if not personal:
        return
    devices = personal["devices"]
    worst = min(devices, key=lambda d: (devices[d]["personal_acc"], d))
    p, g = personal["personal_acc"], personal["global_acc"]
    log.info(
        "%s: personal acc %.4f (p10 %.4f), global acc %.4f (p10 %.4f) on %d devices' held-out "
        "data; worst device %s: personal %.4f, global %.4f",
        what,
        p["mean"],
        p["p10"],
        g["mean"],
        g["p10"],
        p["n"],
        worst,
        devices[worst]["personal_acc"],
        devices[worst]["global_acc"],
    )
