"""B1 of docs/benchmarks.md: digits, Dirichlet(0.5) over 20 devices, MLP 64-128-10, 30 rounds.

Every run goes through the real programs over a private Mosquitto on loopback: the aggregator
process, the device agents in their processes (each with its own MQTT connection) and one agent
alone in a process of its own, whose peak memory is what one device needs.

The B1 protocol (5 local epochs) runs ``--repeats`` times; the figures are medians over the runs.
The same fleet then runs with 1 local epoch, the setting of the reference figures for a general
FL framework quoted in issue 2 (70 ms per round, 49 s start-up, 460 MB per client process).

    python -m benchmarks.b1_digits [--repeats 3] [--rounds 30]
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

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "b1.toml"

# Measured elsewhere on this kind of machine and quoted in issue 2; not re-measured here.
REFERENCE = {"round_s_1_epoch": 0.070, "startup_s": 49.0, "client_rss_mb": 460.0}


def run(cfg: RunConfig, label: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"edgefl-b1-{label}-") as tmp:
        result = run_local(cfg, Path(tmp) / "run")
        if not result.ok:
            raise SystemExit(f"B1 run {label} failed: {result.error}")
        return result.metrics


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        return median([r[key] for r in runs])

    rounds = len(runs[0]["acc_by_round"])
    return {
        "final_acc": med("final_acc"),
        "acc_by_round": [median([r["acc_by_round"][i] for r in runs]) for i in range(rounds)],
        "wall_s": med("wall_s"),
        "startup_s": med("startup_s"),
        "round_wall_s": med("round_wall_s_median"),
        "device_compute_s_per_round": med("device_compute_s_per_round_median"),
        "coordination_s_per_round": med("coordination_s_per_round"),
        "fleet_idle_s_per_round": median(
            [median([x["wall_s"] - x["compute_span_s"] for x in r["rounds"]]) for r in runs]
        ),
        "uplink_bytes_per_device_round": med("uplink_bytes_per_device_round"),
        "downlink_bytes_per_device_round": med("downlink_bytes_per_device_round"),
        "aggregator_peak_rss_mb": med("aggregator_peak_rss_mb"),
        "device_peak_rss_mb": med("device_peak_rss_mb"),
        "onnx_parity_max_abs": median([r["onnx"]["parity_max_abs"] for r in runs]),
        "rollout_s": median([r["deployment"]["rollout_s"] for r in runs]),
        "runs": len(runs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)

    b1 = load(RunConfig, CONFIG, {"rounds": {"rounds": args.rounds}})
    # the 1-epoch runs time rounds against the reference in the same layout as B1 (two
    # processes of agents and one agent alone, whose peak memory is one device's)
    one_epoch = load(RunConfig, CONFIG, {"rounds": {"rounds": args.rounds}, "train": {"epochs": 1}})
    runs, runs_1 = [], []
    for i in range(args.repeats):
        # alternate the two settings so that drifting machine load hits both alike
        print(f"B1 run {i + 1}/{args.repeats} (5 local epochs) ...", flush=True)
        runs.append(run(b1, f"e5-{i}"))
        print(f"B1 run {i + 1}/{args.repeats} (1 local epoch) ...", flush=True)
        runs_1.append(run(one_epoch, f"e1-{i}"))
    s, s1 = summarise(runs), summarise(runs_1)

    per_round = table(
        ["round", "accuracy (5 epochs)", "accuracy (1 epoch)"],
        [
            [i + 1, a, b]
            for i, (a, b) in enumerate(zip(s["acc_by_round"], s1["acc_by_round"], strict=True))
        ],
    )
    ms = 1000.0
    summary = table(
        ["figure", "5 local epochs (B1)", "1 local epoch", "reference FL framework, 1 epoch"],
        [
            ["final test accuracy", s["final_acc"], s1["final_acc"], None],
            ["wall time, s", s["wall_s"], s1["wall_s"], None],
            ["start-up to first round, s", s["startup_s"], s1["startup_s"], REFERENCE["startup_s"]],
            [
                "round wall time, ms",
                s["round_wall_s"] * ms,
                s1["round_wall_s"] * ms,
                REFERENCE["round_s_1_epoch"] * ms,
            ],
            [
                "  slowest device training, ms",
                s["device_compute_s_per_round"] * ms,
                s1["device_compute_s_per_round"] * ms,
                None,
            ],
            [
                "  coordination (wall - slowest), ms",
                s["coordination_s_per_round"] * ms,
                s1["coordination_s_per_round"] * ms,
                None,
            ],
            [
                "  no device computing, ms",
                s["fleet_idle_s_per_round"] * ms,
                s1["fleet_idle_s_per_round"] * ms,
                None,
            ],
            [
                "uplink bytes / device-round",
                s["uplink_bytes_per_device_round"],
                s1["uplink_bytes_per_device_round"],
                None,
            ],
            [
                "downlink bytes / device-round",
                s["downlink_bytes_per_device_round"],
                s1["downlink_bytes_per_device_round"],
                None,
            ],
            [
                "aggregator peak RSS, MB",
                s["aggregator_peak_rss_mb"],
                s1["aggregator_peak_rss_mb"],
                None,
            ],
            [
                "one device agent peak RSS, MB",
                s["device_peak_rss_mb"],
                s1["device_peak_rss_mb"],
                REFERENCE["client_rss_mb"],
            ],
            ["ONNX parity max |diff|", s["onnx_parity_max_abs"], s1["onnx_parity_max_abs"], None],
            ["ONNX rollout to 20 devices, s", s["rollout_s"], s1["rollout_s"], None],
        ],
    )
    text = (
        f"B1: digits, Dirichlet(0.5) over 20 devices, MLP 64-128-10, {args.rounds} rounds, "
        f"medians of {args.repeats} runs each\n\n{per_round}\n\n{summary}\n\n"
        "Reference figures are quoted from issue 2 (a general FL framework with a gRPC runtime, "
        "same data, model and partition, measured on this kind of machine), not re-measured."
    )
    print(text)
    figures = {
        **{k: v for k, v in s.items()},
        "one_epoch": s1,
        "round_s_1_epoch": s1["round_wall_s"],
        "startup_s_1_epoch": s1["startup_s"],
        "reference": REFERENCE,
        "ratios": {
            "round_time_1_epoch_vs_reference": s1["round_wall_s"] / REFERENCE["round_s_1_epoch"],
            "startup_vs_reference": s1["startup_s"] / REFERENCE["startup_s"],
            "device_rss_vs_reference": s["device_peak_rss_mb"] / REFERENCE["client_rss_mb"],
            "device_rss_1_epoch_vs_reference": s1["device_peak_rss_mb"]
            / REFERENCE["client_rss_mb"],
        },
    }
    write_results("b1_digits", figures, text)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
