"""Robust aggregation on B1 with a hostile fifth of the fleet: every rule of aggregator/robust.py
against sign-flipped and scaled updates.

B1 of docs/benchmarks.md (digits, Dirichlet(0.5) over 20 devices with partition seed 0, MLP
64-128-10, SGD lr 0.1, batch 32, 5 local epochs, all devices every round, 30 rounds) simulated
in one process, without MQTT: this measures the aggregation rules, not the network, which
tests/test_byzantine.py covers end to end over the broker. Each round goes through the
aggregator's own library code: the accumulator that ``accumulator_for`` builds from
``[strategy]`` (as ``aggregator/service.py`` does), inside the aggregator's ``Round``, then the
server strategy's step and the same refusal of a non-finite model.

Four of the 20 devices (the same ones as tests/test_byzantine.py) train honestly and then send
their delta multiplied by a factor: -1 (sign-flipped), -10, +10 (a boost), or half of them -1
and half -10. A seed sets the model's initial weights and every device's shuffling; the
partition stays B1's seed 0, so the attackers and their share of the samples are the same in
every run. Figures are medians over seeds, and differences are to the clean FedAvg run
(``mean``, no attack) of the same benchmark run, in accuracy points.

    python -m benchmarks.robust_aggregation [--seeds 3] [--rounds 30] [--jobs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.robust import accumulator_for
from aggregator.rounds import Round
from aggregator.strategies import make_strategy
from benchmarks.common import median, table, write_results
from edgefl.config import RunConfig, load
from edgefl.data import Dataset, load_digits_split, partition
from edgefl.messages import Update
from edgefl.models import build_model, get_weights, model_spec, set_weights
from edgefl.training import evaluate, train_local

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "b1.toml"

# The rules as a user would configure them: [strategy] overrides on B1's configuration.
RULES: dict[str, dict[str, Any]] = {
    "mean (FedAvg)": {"aggregation": "mean"},
    "screened_clip": {"aggregation": "screened_clip"},
    "norm_clip": {"aggregation": "norm_clip"},
    "trimmed_mean (0.2)": {"aggregation": "trimmed_mean", "trim_fraction": 0.2},
    "median": {"aggregation": "median"},
}
BASELINE = "mean (FedAvg)"

# device index -> factor on its delta; indices as in tests/test_byzantine.py
ATTACKERS = (3, 8, 13, 18)
ATTACKS: dict[str, dict[int, float]] = {
    "clean": {},
    "sign-flipped": dict.fromkeys(ATTACKERS, -1.0),
    "x(-10)": dict.fromkeys(ATTACKERS, -10.0),
    "x(+10)": dict.fromkeys(ATTACKERS, 10.0),
    "half each": {3: -1.0, 8: -10.0, 13: -1.0, 18: -10.0},
}

# docs/mqtt.md's promise ("Reliability and security"): within 2 points of the clean run
HOLDS_POINTS = 2.0


@dataclass(frozen=True)
class Job:
    rule: str
    attack: str
    seed: int
    rounds: int


def _device_ids(n: int) -> list[str]:
    return [f"dev-{i}" for i in range(n)]


def _fleet(cfg: RunConfig) -> tuple[list[Dataset], Dataset]:
    """B1's devices' data and the held-out test split, as the local run writes them."""
    train, test = load_digits_split(cfg.data.test_fraction, seed=0)
    d = cfg.data
    parts = partition(train.y, cfg.demo.devices, d.partition, d.alpha, d.seed, d.min_samples)
    return [Dataset(train.X[p], train.y[p]) for p in parts], test


def _train_seed(seed: int, device_id: str, rnd: int) -> int:
    # as a device agent derives its shuffling from its id and the round, plus the run's seed
    digest = hashlib.sha256(f"{seed}/{device_id}/{rnd}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def simulate(job: Job) -> dict[str, Any]:
    """One run of ``job.rounds`` rounds; accuracy after each, and what the rule dropped."""
    cfg = load(RunConfig, CONFIG, {"strategy": RULES[job.rule], "seed": job.seed})
    devices, test = _fleet(cfg)
    ids = _device_ids(len(devices))
    attack = ATTACKS[job.attack]
    tc, sc = cfg.train, cfg.strategy

    model = build_model(cfg.model.name, seed=cfg.seed)
    spec = model_spec(model)
    weights = get_weights(model)
    strategy = make_strategy(sc)
    accuracy: list[float] = []
    dropped: list[int] = []
    started = time.perf_counter()
    for number in range(1, job.rounds + 1):
        # the accumulator the aggregator builds from [strategy], in the aggregator's own Round
        acc = accumulator_for(sc, spec)
        rnd = Round(number, number - 1, ids, math.inf, spec, accumulator=acc)
        for i, (device_id, data) in enumerate(zip(ids, devices, strict=True)):
            set_weights(model, weights)
            train_local(
                model,
                data,
                epochs=tc.epochs,
                batch_size=tc.batch_size,
                lr=tc.lr,
                seed=_train_seed(job.seed, device_id, number),
            )
            trained = get_weights(model)
            factor = attack.get(i, 1.0)  # an attacker trains honestly, then twists its delta
            delta = {k: factor * (trained[k] - weights[k]) for k in weights}
            # the aggregator's intake refuses these before they reach the round
            biggest = max(float(np.abs(v).max()) for v in delta.values())
            if not math.isfinite(biggest) or biggest > cfg.limits.max_delta_abs:
                continue
            rnd.offer(Update(device_id, number, number - 1, len(data), delta), 0)
        mean = rnd.aggregate()
        stepped = strategy.step(weights, mean) if mean is not None else None
        # as the aggregator does: a round that would make the model non-finite is discarded
        if stepped is not None and all(np.isfinite(w).all() for w in stepped.values()):
            weights = stepped
        dropped.append(int(getattr(acc, "dropped", 0)))
        set_weights(model, weights)
        accuracy.append(evaluate(model, test)[1])
    return {
        "rule": job.rule,
        "attack": job.attack,
        "seed": job.seed,
        "acc_by_round": accuracy,
        "final_acc": accuracy[-1],
        "dropped_per_round": float(np.mean(dropped)),
        "seconds": time.perf_counter() - started,
    }


def _one_thread() -> None:
    import torch

    # a device trains with one thread; the runs share the cores instead
    torch.set_num_threads(1)


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100.0 * (a - b), 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    cfg = load(RunConfig, CONFIG)
    devices, _ = _fleet(cfg)
    sizes = [len(d) for d in devices]
    attacker_share = sum(sizes[i] for i in ATTACKERS) / sum(sizes)
    seeds = list(range(args.seeds))
    # seed outermost: a run stopped early still has whole seeds of every cell
    jobs = [Job(r, a, s, args.rounds) for s in seeds for r in RULES for a in ATTACKS]
    print(
        f"robust aggregation on B1: {len(RULES)} rules x {len(ATTACKS)} attacks x "
        f"{len(seeds)} seeds = {len(jobs)} runs of {args.rounds} rounds, {args.jobs} at a time; "
        "simulated in one process without MQTT (this measures the aggregation rules, "
        "not the network)",
        flush=True,
    )
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    # spawn, not fork: a forked torch can hang on its thread pool
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, ctx, initializer=_one_thread) as pool:
        for n, run in enumerate(pool.map(simulate, jobs), 1):
            runs.append(run)
            print(
                f"  [{n}/{len(jobs)}] seed {run['seed']} {run['rule']:<18} {run['attack']:<12} "
                f"acc {run['final_acc']:.4f}  ({run['seconds']:.1f} s)",
                flush=True,
            )
    wall_s = time.perf_counter() - started

    def cell(rule: str, attack: str) -> list[float]:
        return [r["final_acc"] for r in runs if r["rule"] == rule and r["attack"] == attack]

    acc = {r: {a: median(cell(r, a)) for a in ATTACKS} for r in RULES}
    clean = acc[BASELINE]["clean"]
    points = {r: {a: _points(acc[r][a], clean) for a in ATTACKS} for r in RULES}
    holds = {
        r: all(v is not None and v >= -HOLDS_POINTS for v in points[r].values()) for r in RULES
    }
    dropped = {
        r: {
            a: median([x["dropped_per_round"] for x in runs if x["rule"] == r and x["attack"] == a])
            for a in ATTACKS
        }
        for r in RULES
        if RULES[r]["aggregation"] == "screened_clip"
    }

    acc_table = table(["rule", *ATTACKS], [[r, *(acc[r][a] for a in ATTACKS)] for r in RULES])
    pts_table = table(
        ["rule", *ATTACKS, f"all within {HOLDS_POINTS:g}"],
        [
            [r, *(f"{points[r][a]:+.1f}" for a in ATTACKS), "yes" if holds[r] else "no"]
            for r in RULES
        ],
    )
    per_seed = table(
        ["rule", *ATTACKS],
        [[r, *(" ".join(f"{v:.3f}" for v in cell(r, a)) for a in ATTACKS)] for r in RULES],
    )
    text = (
        f"Robust aggregation on B1 (digits, Dirichlet(0.5) over 20 devices, partition seed 0, "
        f"MLP 64-128-10, SGD lr {cfg.train.lr}, batch {cfg.train.batch_size}, "
        f"{cfg.train.epochs} local epochs, all devices every round, {args.rounds} rounds).\n"
        f"Simulated in one process without MQTT: it measures the aggregation rules "
        f"(aggregator/robust.py in the aggregator's Round), not the network.\n"
        f"Attackers: devices {', '.join(map(str, ATTACKERS))} (4 of 20, "
        f"{100 * attacker_share:.0f} % of the samples) train honestly and send their delta "
        f"x(-1), x(-10), x(+10), or half x(-1) and half x(-10).\n"
        f"Seeds {', '.join(map(str, seeds))} (model init and shuffling); medians over seeds.\n\n"
        f"Final test accuracy:\n\n{acc_table}\n\n"
        f"Difference to clean FedAvg ({clean:.4f}) in points:\n\n{pts_table}\n\n"
        f"Final accuracy per seed:\n\n{per_seed}\n\n"
        f"screened_clip drops per round (median over seeds of the mean per round): "
        + ", ".join(f"{a} {v:.2f}" for a, v in dropped.get("screened_clip", {}).items())
        + f"\n\n{len(jobs)} runs in {wall_s:.0f} s wall on {args.jobs} processes."
    )
    print(text)
    figures: dict[str, Any] = {
        "protocol": "B1 simulated in one process, no MQTT",
        "rounds": args.rounds,
        "seeds": seeds,
        "partition_seed": cfg.data.seed,
        "attackers": list(ATTACKERS),
        "attacker_sample_share": attacker_share,
        "attacks": {a: {str(k): v for k, v in f.items()} for a, f in ATTACKS.items()},
        "rules": RULES,
        "final_acc": acc,
        "points_vs_clean_mean": points,
        "within_2_points": holds,
        "screened_clip_dropped_per_round": dropped.get("screened_clip", {}),
        "wall_s": wall_s,
        "jobs": args.jobs,
        "runs": [{k: v for k, v in r.items() if k != "seconds"} for r in runs],
    }
    write_results("robust_aggregation", figures, text)
    summary = {
        "benchmark": "robust_aggregation",
        "clean_mean_acc": clean,
        "final_acc": acc,
        "points_vs_clean_mean": points,
        "within_2_points": holds,
        "wall_s": round(wall_s, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
