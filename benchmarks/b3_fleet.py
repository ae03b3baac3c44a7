"""B3 of docs/benchmarks.md: B1 on a heterogeneous fleet, uniform workloads against the scheduler.

The fleet of configs/b3.toml: 20 simulated devices, compute 1x, 2x, 4x and 8x slower (five
each), batteries between 10 and 100 % (some charging, some on mains), some links at 500 or
1,000 kbit/s; slowness and links take real wall time. Every run goes through the real programs
over a private Mosquitto (launch.local.run_local), one MQTT connection per device.

- uniform: every device gets the B1 workload (5 epochs, dense fp32) every round and the round
  waits up to the deadline (2 s) for it, as edgefl did before the scheduler: no battery floor on
  either side, no overcommit, plain FedAvg.
- scheduler: configs/b3.toml as it is: adaptive workloads within a time budget, codecs by link,
  battery floor 20 % on both sides, 10 % overcommit, FedNova.

The two alternate, ``--repeats`` times each; figures are medians over the runs:
time to 90 % test accuracy (sum of round wall times up to the first round at or above it),
updates lost (asked devices whose update did not make it into the round: at the deadline, or
cut by overcommit), devices driven under the battery floor (every device, charging or not, whose
battery fell during some work it did to below 20 %, or further below it; the devices' own
accounts, see :func:`floor_violations`), energy
(what the devices spent, from their CPU time and power model, lost work included; and the
aggregator's estimate for the work it received), final accuracy after 30 rounds.

    python -m benchmarks.b3_fleet [--repeats 3] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import median, table, write_results
from edgefl.config import RunConfig, load
from launch.local import run_local

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "b3.toml"
TARGET = 0.90

# what "uniform" changes in configs/b3.toml: the behaviour before resource-aware rounds
UNIFORM = {
    "schedule": {"workload": "uniform"},
    "rounds": {"overcommit": 0.0, "battery_floor_pct": 0.0},
    "strategy": {"fednova": False},
}


def run(cfg: RunConfig, label: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"edgefl-b3-{label}-") as tmp:
        result = run_local(cfg, Path(tmp) / "run")
        if not result.ok:
            raise SystemExit(f"B3 run {label} failed: {result.error}")
        return result.metrics


def floor_violations(hardware: dict[str, dict[str, Any]], floor: float) -> list[str]:
    """Devices that work drove under the battery floor, or further under it, sorted.

    ``hardware`` is each device's account (device/profiles.py, ``Hardware.report``): its
    ``lowest_after_work_pct`` is the lowest level right after any work that made its battery
    fall, charging or not (a charger weaker than the work's draw does not make it safe), and
    None if no work ever did. A device that started under the floor and whose work only ever
    ran while its charger kept it rising is no violation; one that fell by work at all while
    under the floor is."""
    return sorted(
        d
        for d, h in hardware.items()
        if h.get("lowest_after_work_pct") is not None and h["lowest_after_work_pct"] < floor
    )


def figures(m: dict[str, Any], floor: float) -> dict[str, Any]:
    """One run's B3 figures from its metrics.json."""
    rounds = m["rounds"]
    elapsed, time_to, round_to = 0.0, None, None
    for r in rounds:
        elapsed += r["wall_s"]
        if time_to is None and r["accuracy"] is not None and r["accuracy"] >= TARGET:
            time_to, round_to = elapsed, r["round"]
    late = sum(len(r["missing"]) for r in rounds if r["closed_by"] != "enough")
    cut = sum(len(r["missing"]) for r in rounds if r["closed_by"] == "enough")
    hardware: dict[str, dict[str, Any]] = {}
    for proc in m["device_processes"].values():
        hardware.update(proc.get("hardware", {}))
    under = floor_violations(hardware, floor)
    return {
        "time_to_90_s": time_to,
        "rounds_to_90": round_to,
        "lost_updates": late + cut,
        "lost_at_deadline": late,
        "cut_by_overcommit": cut,
        "declined": sum(
            1 for r in rounds for kind in r.get("withdrawn", {}).values() if kind == "declined"
        ),
        "replaced": sum(len(r.get("replaced", {})) for r in rounds),
        "battery_floor_violations": len(under),
        "devices_under_floor": under,
        "energy_j": sum(h["energy_j"] for h in hardware.values()),
        "energy_received_j": sum(r.get("energy_j", 0.0) for r in rounds),
        "final_acc": rounds[-1]["accuracy"] if rounds else None,
        "round_wall_s": median([r["wall_s"] for r in rounds]),
        "rounds_wall_s": sum(r["wall_s"] for r in rounds),
        "participants_per_round": median([r["participants"] for r in rounds]),
        "reported_per_round": median([r["reported"] for r in rounds]),
        "acc_by_round": [r["accuracy"] for r in rounds],
        "battery": {
            d: (h["battery_start_pct"], h["battery_pct"], h["lowest_after_work_pct"])
            for d, h in sorted(hardware.items())
            if h["battery_start_pct"] is not None
        },
    }


def summarise_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of every number over the runs; time to 90 % with unreached runs counted as
    slowest; the worst battery-floor figures. B7 (b7_async.py) summarises its runs so too."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) or v is None]
    out: dict[str, Any] = {k: median([r[k] for r in runs]) for k in keys}
    # a run that never reached the target counts as slower than any that did
    if any(r["time_to_90_s"] is None for r in runs):
        reached = [r["time_to_90_s"] for r in runs if r["time_to_90_s"] is not None]
        out["time_to_90_s"] = None if len(reached) * 2 <= len(runs) else max(reached)
    out["battery_floor_violations"] = max(r["battery_floor_violations"] for r in runs)
    out["devices_under_floor"] = sorted({d for r in runs for d in r["devices_under_floor"]})
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = summarise_medians(runs)
    n = len(runs[0]["acc_by_round"])
    out["acc_by_round"] = [median([r["acc_by_round"][i] for r in runs]) for i in range(n)]
    out["battery"] = runs[-1]["battery"]
    out["runs"] = len(runs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)

    over = {"rounds": {"rounds": args.rounds}}
    sched_cfg = load(RunConfig, CONFIG, over)
    uniform_cfg = load(
        RunConfig, CONFIG, {**UNIFORM, "rounds": {**UNIFORM["rounds"], **over["rounds"]}}
    )
    floor = sched_cfg.rounds.battery_floor_pct
    runs: dict[str, list[dict[str, Any]]] = {"uniform": [], "scheduler": []}
    for i in range(args.repeats):
        # alternate, so that drifting machine load hits both alike
        for label, cfg in (("uniform", uniform_cfg), ("scheduler", sched_cfg)):
            print(f"B3 run {i + 1}/{args.repeats} ({label}) ...", flush=True)
            runs[label].append(figures(run(cfg, f"{label}-{i}"), floor))
    u, s = summarise(runs["uniform"]), summarise(runs["scheduler"])
    ratio = (
        u["time_to_90_s"] / s["time_to_90_s"]
        if u["time_to_90_s"] is not None and s["time_to_90_s"] is not None
        else None
    )

    rows = [
        ["wall time to 90 % test accuracy, s", "time_to_90_s"],
        ["  round reaching it", "rounds_to_90"],
        ["updates lost", "lost_updates"],
        ["  at the deadline (late)", "lost_at_deadline"],
        ["  cut by overcommit", "cut_by_overcommit"],
        ["declined by devices (battery)", "declined"],
        ["  replaced", "replaced"],
        [f"devices driven under the {floor:g} % battery floor", "battery_floor_violations"],
        ["energy spent by the fleet, J", "energy_j"],
        ["  of which in updates received, J (aggregator's estimate)", "energy_received_j"],
        ["final test accuracy", "final_acc"],
        ["round wall time (median), s", "round_wall_s"],
        [f"wall time of {args.rounds} rounds, s", "rounds_wall_s"],
        ["participants / reported per round (median)", None],
    ]
    body = []
    for name, key in rows:
        if key is None:
            body.append(
                [
                    name,
                    f"{u['participants_per_round']:g} / {u['reported_per_round']:g}",
                    f"{s['participants_per_round']:g} / {s['reported_per_round']:g}",
                ]
            )
        else:
            body.append([name, u[key], s[key]])
    summary = table(["figure", "uniform", "scheduler"], body)
    per_round = table(
        ["round", "accuracy (uniform)", "accuracy (scheduler)"],
        [
            [i + 1, a, b]
            for i, (a, b) in enumerate(zip(u["acc_by_round"], s["acc_by_round"], strict=True))
        ],
    )
    battery = table(
        ["device", "uniform: start / end / lowest after work, %", "scheduler: same"],
        [
            [d, _battery(u["battery"].get(d)), _battery(s["battery"].get(d))]
            for d in sorted(set(u["battery"]) | set(s["battery"]))
        ],
    )
    under = ", ".join(u["devices_under_floor"]) or "none"
    text = (
        f"B3: digits, Dirichlet(0.5) over 20 simulated devices (configs/b3.toml), MLP 64-128-10, "
        f"{args.rounds} rounds, round deadline {sched_cfg.rounds.deadline_s:g} s; medians of "
        f"{args.repeats} run(s) each\n\n{summary}\n\n"
        f"time to 90 %: uniform / scheduler = {'-' if ratio is None else f'{ratio:.2f}'}\n"
        f"devices under the floor with uniform workloads: {under}\n\n"
        f"{per_round}\n\nbatteries (last run of each; devices on mains left out)\n\n{battery}"
    )
    print(text)
    keep = (
        "time_to_90_s",
        "lost_updates",
        "battery_floor_violations",
        "energy_j",
        "final_acc",
    )
    result = {
        "uniform": {k: u[k] for k in keep},
        "scheduler": {k: s[k] for k in keep},
    }
    write_results(
        "b3_fleet",
        {**result, "time_to_90_ratio": ratio, "detail": {"uniform": u, "scheduler": s}},
        text,
    )
    print(json.dumps(result))
    return 0


def _battery(b: tuple[float, float, float | None] | list | None) -> str:
    if not b:
        return "-"
    start, end, low = b
    return f"{start:.1f} / {end:.1f} / {'-' if low is None else f'{low:.1f}'}"


if __name__ == "__main__":
    raise SystemExit(main())
