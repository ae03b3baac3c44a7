"""B2 of docs/benchmarks.md: B1 with each update codec, dense fp32 as the baseline in the same run.

Every run is B1 through the real programs over a private Mosquitto (launch.local.run_local, as
B1): 20 device agents with their own MQTT connections, the aggregator, 30 rounds of FedAvg. Only
the ``[codec]`` table changes between runs. Each codec runs once per seed; seed ``s`` sets both
``seed`` (the initial model) and ``data.seed`` (the Dirichlet partition over the devices).

Bytes per update are the update payloads the device agents published (counted by their MQTT
links where they publish), divided by the updates they sent. The ratio is dense fp32's bytes
per update over the codec's; the baseline is plain dense fp32, zstd off (``dense_fp32+zstd``
shows what lossless zstd alone does). Accuracy is the global model's test accuracy after the
last round, median over the seeds; its difference to dense fp32's median is a fraction
(-0.008 is 0.8 points below).

    python -m benchmarks.b2_compression [--seeds 0,1,2] [--codecs topk,int8] [--rounds 30]

``--codecs`` keeps the codecs whose name contains one of the given words (dense fp32 always
runs). Results are written to benchmarks/results/b2_compression.* only for a full run (all
codecs, 3+ seeds, 30 rounds); ``--save NAME`` writes any run to benchmarks/results/NAME.* (the
committed ``b2_heldout_seeds`` checks the best codecs on seeds they were not chosen on:
``--seeds 3,4,5 --codecs best,"topk 1% 4b" --save b2_heldout_seeds``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median, table, write_results
from edgefl.config import RunConfig, load
from launch.local import run_local

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "b1.toml"
BASELINE = "dense_fp32"

# DGC momentum correction and one scale per 128 kept values: what the exploration in-process
# (same code, no MQTT) found best for B1's 30 rounds.
_BEST = {"name": "topk", "momentum": 0.5, "block": 128}


def codecs() -> dict[str, dict[str, Any]]:
    """Each codec's [codec] table, by the name the table shows."""
    out: dict[str, dict[str, Any]] = {
        BASELINE: {"name": "dense_fp32", "zstd": False},
        "dense_fp32+zstd": {"name": "dense_fp32"},
        "fp16": {"name": "fp16"},
        "int8": {"name": "int8", "block": 64},
        "prune 0.02 8b EF": {"name": "prune", "threshold": 0.02, "bits": 8},
        "prune 0.02 8b": {"name": "prune", "threshold": 0.02, "bits": 8, "error_feedback": False},
    }
    for pct in (10, 5, 2, 1, 0.5):
        for bits in (8, 4):
            for ef in (True, False):
                name = f"topk {pct:g}% {bits}b" + (" EF" if ef else "")
                out[name] = {
                    "name": "topk",
                    "fraction": pct / 100,
                    "bits": bits,
                    "error_feedback": ef,
                }
    out["best ~100x: topk 2% 4b EF+DGC"] = {**_BEST, "fraction": 0.02, "bits": 4}
    out["best ~200x: topk 1% 2b EF+DGC"] = {**_BEST, "fraction": 0.01, "bits": 2}
    out["best ~500x: topk 0.09% 2b EF+DGC"] = {**_BEST, "fraction": 0.0009, "bits": 2}
    out["best ~200x + delta downlink"] = {
        **_BEST,
        "fraction": 0.01,
        "bits": 2,
        "downlink": "delta",
    }
    return out


def run_one(codec: dict[str, Any], seed: int, rounds: int, attempts: int = 2) -> dict[str, Any]:
    """One B1 run with ``codec``; a failed run (a broker port taken, a machine hiccup) is kept
    for reading and tried again once."""
    cfg = load(
        RunConfig,
        CONFIG,
        {"seed": seed, "data": {"seed": seed}, "rounds": {"rounds": rounds}, "codec": codec},
    )
    for attempt in range(1, attempts + 1):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="edgefl-b2-") as tmp:
            result = run_local(cfg, Path(tmp) / "run")
            if result.ok:
                return _figures(result.metrics, seed, time.perf_counter() - started)
            kept = Path(tempfile.mkdtemp(prefix="edgefl-b2-failed-"))
            shutil.copytree(Path(tmp) / "run", kept / "run", ignore=shutil.ignore_patterns("data"))
        print(
            f"  run {codec} seed {seed} failed (attempt {attempt}/{attempts}): "
            f"{result.error or 'no rounds completed'}; its logs are in {kept}",
            flush=True,
        )
    raise SystemExit(f"B2 run {codec} seed {seed} failed {attempts} times")


def _figures(m: dict[str, Any], seed: int, wall_s: float) -> dict[str, Any]:
    procs = m["device_processes"].values()
    sent = sum(p["updates_sent"] for p in procs)
    return {
        "seed": seed,
        "final_acc": m["final_acc"],
        "bytes_per_update": sum(p["uplink_bytes"] for p in procs) / max(sent, 1),
        "updates": sent,
        # the aggregator's count of what one device downloads per round (model and task)
        "downlink_bytes_per_device_round": m["downlink_bytes_per_device_round"],
        "rejected": m["rejected"],
        "wall_s": wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--codecs", default="", help="comma-separated words; keep codecs naming one")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--save", metavar="NAME", help="write this run to benchmarks/results/NAME.*")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    words = [w.strip().lower() for w in args.codecs.split(",") if w.strip()]
    every = codecs()
    chosen = {
        name: c
        for name, c in every.items()
        if name == BASELINE or not words or any(w in name.lower() for w in words)
    }
    full_run = len(chosen) == len(every) and len(seeds) >= 3 and args.rounds == 30

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    total, done = len(chosen) * len(seeds), 0
    for seed in seeds:  # seed by seed, so that drifting machine load hits every codec alike
        for name, codec in chosen.items():
            done += 1
            r = run_one(codec, seed, args.rounds)
            runs[name].append(r)
            print(
                f"[{done}/{total}] {name}, seed {seed}: acc {r['final_acc']:.4f}, "
                f"{r['bytes_per_update']:.1f} B/update, {r['wall_s']:.1f} s",
                flush=True,
            )

    base_bytes = median([r["bytes_per_update"] for r in runs[BASELINE]])
    base_acc = median([r["final_acc"] for r in runs[BASELINE]])
    rows, out = [], []
    for name, rs in runs.items():
        nbytes = median([r["bytes_per_update"] for r in rs])
        acc = median([r["final_acc"] for r in rs])
        down = median([r["downlink_bytes_per_device_round"] for r in rs])
        entry = {
            "name": name,
            "bytes_per_update": round(nbytes, 1),
            "ratio": round(base_bytes / nbytes, 2),
            "final_acc": round(acc, 4),
            "acc_delta": round(acc - base_acc, 4),
        }
        out.append(entry)
        rows.append(
            [
                name,
                entry["bytes_per_update"],
                f"{entry['ratio']:.1f}x",
                f"{acc:.4f}",
                f"{100 * (acc - base_acc):+.2f}",
                " ".join(f"{r['final_acc']:.4f}" for r in rs),
                round(down),
            ]
        )
    text = (
        f"B2: B1 (digits, Dirichlet(0.5) over 20 devices, MLP 64-128-10, {args.rounds} rounds, "
        f"FedAvg) over MQTT with each update codec; seeds {','.join(map(str, seeds))} (model "
        "init and data partition); medians over seeds\n\n"
        + table(
            [
                "codec",
                "bytes/update",
                "ratio",
                "final acc",
                "vs dense, points",
                "per seed",
                "downlink B/dev-round",
            ],
            rows,
        )
        + "\n\nbytes/update: update payloads published by the device agents / updates sent. "
        "EF: error feedback; DGC: momentum correction 0.5 with momentum factor masking; "
        "b: bits per kept value (stochastic rounding); scales per tensor, or per 128 values "
        "(best rows) or 64 (int8). Downlink: fp32 model each round unless noted."
    )
    print(text)
    figures = {"codecs": out}
    detail = {"seeds": seeds, "rounds": args.rounds, "configs": chosen, "runs": runs}
    if args.save:
        write_results(args.save, {**figures, **detail}, text)
    elif full_run:
        write_results("b2_compression", {**figures, **detail}, text)
    else:
        print("(a filtered run: benchmarks/results/ left as it is)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
