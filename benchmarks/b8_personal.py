"""B8 of docs/benchmarks.md: personalised models against FedAvg's global model and against
training alone, each device judged on a held-out split of its own data.

Three data sets, each a config of its own:

- ``digits`` (configs/b8_digits.toml): B1 with Dirichlet(0.1) label skew over 20 devices;
- ``fmnist`` (configs/b8_fmnist.toml): B9's Fashion-MNIST CNN with Dirichlet(0.1) over 20
  devices, on an 8,000-image training subset and 30 rounds (B9 uses 20,000 and 50);
- ``watch`` (configs/b8_watch.toml): B9's smartwatch fleet, one device per wearer.

For each data set, seed and method (``[personal] method``: ``local`` training alone, then
``finetune``, ``fedper``, ``fedrep``, ``ditto``, ``apfl``, ``perfedavg``) one run goes through the
real programs (launch.local.run_local: Mosquitto, the aggregator, the device agents, each with
its own MQTT connection). Every device holds out ``[personal] holdout`` of its data, and every
round reports its personal model's accuracy on it and that of the round's global model. A
device's figure is the latest it reported (every device takes part in every round); a run's
figures are the mean, the 10th percentile (linear interpolation between devices) and the worst
over the devices, unweighted (each device counts once, whatever its size), and the global
model's accuracy on the pooled test set after the last round. Each figure is the median over
seeds; a seed sets the run's seed (initial weights) and ``data.seed`` (the Dirichlet draw and,
for Fashion-MNIST, the subset). The watch partition is by wearer and has no seed.

FedAvg's global model is the ``global_acc`` of the ``finetune`` runs: their shared training is
plain FedAvg on the devices' training splits, so their global model is FedAvg's, evaluated on the
same held-out splits as every method (a device draws its split from its id alone, so it is the
same in every method's run of a seed). ``local``, ``ditto`` and ``apfl`` train the same global
model; the table's "its global" column shows each method's, a check on FedAvg's. "FedAvg +
fine-tuning" is ``finetune``'s personal accuracy; "local-only" is ``local``'s. The best method is
the personalised method (not ``local``) with the highest median mean.

The watch set's windows (2 s every 1 s) overlap by half: a random draw of held-out windows
would share readings with training windows and flatter models fitted to that one device (one
seed before this was fixed: local-only 0.98 on such windows). So configs/b8_watch.toml holds
out the last fifth of each exercise a wearer recorded, one window short of it left out
(``holdout_split = "latest"``, ``holdout_gap = 1``): what the device would see next, sharing no
reading with what it trained on.

Time on 2 cores (AMD EPYC), one seed of every method on the personalisation branch before it
was merged: digits 11-14 s a run (about 1.5 minutes for the seven), watch 19-33 s (3.5
minutes), Fashion-MNIST 56-93 s (9 minutes; at B9's 20,000 images a round takes about three
times as long, hence the subset). The whole benchmark, 3 seeds, takes about 42 minutes.

    python -m benchmarks.b8_personal [--datasets digits,fmnist,watch] [--seeds 3] [--rounds N]
                                     [--methods local,finetune,...] [--set TABLE.KEY=VALUE]

The last line printed is JSON: ``{"datasets": {"digits": {...}, "fmnist": {...}, "watch":
{...}}}``, each with ``fedavg_global_mean``, ``fedavg_worst``, ``local_only_mean``,
``local_only_worst``, ``finetune_mean``, ``best_method``, ``best_mean``, ``best_p10``,
``best_worst`` and more (accuracies as fractions), the issue's targets met or not, and
``methods``, the per-method table.
Results are written to benchmarks/results/b8_personal.* for a full run (every data set and
method, the configs' rounds, 3 seeds or more), or under ``--save NAME``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import median, table, write_results

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    "digits": ROOT / "configs" / "b8_digits.toml",
    "fmnist": ROOT / "configs" / "b8_fmnist.toml",
    "watch": ROOT / "configs" / "b8_watch.toml",
}
LOCAL = "local"
METHODS = (LOCAL, "finetune", "fedper", "fedrep", "ditto", "apfl", "perfedavg")
PERSONALISED = tuple(m for m in METHODS if m != LOCAL)
# methods whose shared training is plain FedAvg (device/personal/: the update they send is the
# task's global model after plain local SGD), so that their global model is FedAvg's; the first
# of them that ran gives "FedAvg's global model", and the others' are a check on it
FEDAVG_FROM = ("finetune", "local", "ditto", "apfl")
# the targets (in accuracy points), reported as checks, never asserted
OVER_FEDAVG_POINTS = 10.0
OVER_LOCAL_POINTS = 1.0


# --- figures: pure functions of metrics dicts (tests/test_personal_benchmark.py) -------------


def latest_per_device(rounds: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each device's last reported accuracies: later rounds overwrite earlier ones."""
    latest: dict[str, dict[str, Any]] = {}
    for r in rounds:
        devices = (r.get("personal") or {}).get("devices") or {}
        for device_id, figures in devices.items():
            latest[device_id] = figures
    return latest


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, 10th percentile (linear between devices) and worst over devices, unweighted."""
    if not values:
        return {"mean": None, "p10": None, "worst": None, "n": 0}
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "p10": float(np.percentile(a, 10)),
        "worst": float(a.min()),
        "n": len(a),
    }


def pooled_accuracy(rounds: Sequence[dict[str, Any]]) -> float | None:
    """The global model on the pooled test set after the last round that evaluated it."""
    accs = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    return accs[-1] if accs else None


def run_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """One run's B8 figures from launch.local's metrics."""
    rounds = metrics.get("rounds", [])
    latest = latest_per_device(rounds)

    def values(key: str) -> list[float]:
        return [f[key] for f in latest.values() if f.get(key) is not None]

    holdouts = [int(f["holdout_samples"]) for f in latest.values() if "holdout_samples" in f]
    updates = sum(r.get("reported", 0) for r in rounds)
    return {
        "personal": spread(values("personal_acc")),
        "global": spread(values("global_acc")),
        "pooled_acc": pooled_accuracy(rounds),
        "devices": len(latest),
        "smallest_holdout": min(holdouts) if holdouts else None,
        "uplink_bytes_per_update": (
            sum(r.get("uplink_bytes", 0) for r in rounds) / updates if updates else None
        ),
        "rounds": len(rounds),
        "wall_s": metrics.get("wall_s"),
        "per_device": {
            d: {k: f.get(k) for k in ("personal_acc", "global_acc", "holdout_samples")}
            for d, f in sorted(latest.items())
        },
    }


def _medians(runs: Sequence[dict[str, Any]], which: str) -> dict[str, float | None]:
    return {k: median([r[which][k] for r in runs]) for k in ("mean", "p10", "worst")}


def method_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds of one method's runs, figure by figure."""
    return {
        **_medians(runs, "personal"),
        "global": _medians(runs, "global"),
        "pooled_acc": median([r["pooled_acc"] for r in runs]),
        "uplink_bytes_per_update": median([r["uplink_bytes_per_update"] for r in runs]),
        "smallest_holdout": min(
            (r["smallest_holdout"] for r in runs if r["smallest_holdout"] is not None),
            default=None,
        ),
        "wall_s": median([r["wall_s"] for r in runs]),
        "seeds": len(runs),
        "mean_by_seed": [r["personal"]["mean"] for r in runs],
    }


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100.0 * (a - b), 2)


def dataset_summary(by_method: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The issue's figures for one data set from its runs, ``{method: [run figures by seed]}``."""
    methods = {m: method_summary(runs) for m, runs in by_method.items() if runs}
    fedavg_from = next((m for m in FEDAVG_FROM if m in methods), None)
    fedavg = methods[fedavg_from]["global"] if fedavg_from else {}
    local = methods.get(LOCAL, {})
    finetune = methods.get("finetune", {})
    ranked = [m for m in PERSONALISED if methods.get(m, {}).get("mean") is not None]
    best = max(ranked, key=lambda m: methods[m]["mean"]) if ranked else None
    b = methods[best] if best else {}
    worst_to_beat = [w for w in (fedavg.get("worst"), local.get("worst")) if w is not None]
    holdouts = [s["smallest_holdout"] for s in methods.values() if s["smallest_holdout"]]
    return {
        "fedavg_global_mean": fedavg.get("mean"),
        "fedavg_global_p10": fedavg.get("p10"),
        "fedavg_worst": fedavg.get("worst"),
        "fedavg_pooled_acc": methods[fedavg_from]["pooled_acc"] if fedavg_from else None,
        "fedavg_from": fedavg_from,
        "local_only_mean": local.get("mean"),
        "local_only_p10": local.get("p10"),
        "local_only_worst": local.get("worst"),
        "finetune_mean": finetune.get("mean"),
        "finetune_p10": finetune.get("p10"),
        "finetune_worst": finetune.get("worst"),
        "best_method": best,
        "best_mean": b.get("mean"),
        "best_p10": b.get("p10"),
        "best_worst": b.get("worst"),
        "best_pooled_acc": b.get("pooled_acc"),
        "best_over_fedavg_points": _points(b.get("mean"), fedavg.get("mean")),
        "best_over_local_points": _points(b.get("mean"), local.get("mean")),
        "best_worst_holds": (
            b["worst"] >= max(worst_to_beat)
            if b.get("worst") is not None and worst_to_beat
            else None
        ),
        "smallest_holdout": min(holdouts, default=None),
        "methods": {
            m: {k: s[k] for k in ("mean", "p10", "worst", "pooled_acc", "seeds")}
            | {
                "global_mean": s["global"]["mean"],
                "uplink_bytes_per_update": s["uplink_bytes_per_update"],
            }
            for m, s in methods.items()
        },
    }


def targets_met(s: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's "Done when" for one data set, as yes / no / unknown."""
    over_fedavg, over_local = s["best_over_fedavg_points"], s["best_over_local_points"]
    return {
        f"best >= FedAvg global + {OVER_FEDAVG_POINTS:g} points": None
        if over_fedavg is None
        else over_fedavg >= OVER_FEDAVG_POINTS,
        f"best >= local-only + {OVER_LOCAL_POINTS:g} point": None
        if over_local is None
        else over_local >= OVER_LOCAL_POINTS,
        "best's worst device >= FedAvg's and local-only's": s["best_worst_holds"],
    }


# --- runs --------------------------------------------------------------------------------------


def config_for(
    name: str,
    method: str,
    seed: int,
    rounds: int | None,
    settings: dict[str, Any] | None = None,
):
    """The run's config: the data set's file, ``settings`` (what --set changes, a sweep's) over
    it, and the run's method, seed and rounds over both."""
    from edgefl.config import RunConfig, load, merge

    over: dict[str, Any] = {"seed": seed, "data": {"seed": seed}, "personal": {"method": method}}
    if rounds:
        over["rounds"] = {"rounds": rounds}
    return load(RunConfig, DATASETS[name], merge(settings or {}, over))


def parse_setting(text: str) -> dict[str, Any]:
    """``personal.ditto_lambda=0.5`` as the nested table it overrides (the value in TOML)."""
    import tomllib

    key, sep, value = text.partition("=")
    parts = [k.strip() for k in key.split(".")]
    if not sep or not all(parts):
        raise ValueError(f"{text!r}: expected table.key=value")
    try:
        out: dict[str, Any] = {parts[-1]: tomllib.loads(f"v = {value.strip()}")["v"]}
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{text!r}: the value is not TOML ({e})") from None
    for k in reversed(parts[:-1]):
        out = {k: out}
    return out


def missing_data(name: str) -> str | None:
    """Why a data set cannot run here (not installed), or None."""
    from edgefl.data import DataMissingError, load_split

    try:
        load_split(config_for(name, LOCAL, 0, None).data)
    except DataMissingError as e:
        return str(e)
    return None


def one_run(
    name: str,
    method: str,
    seed: int,
    rounds: int | None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run of ``method`` on data set ``name`` through the real programs, and its figures."""
    from launch.local import run_local

    cfg = config_for(name, method, seed, rounds, settings)
    with tempfile.TemporaryDirectory(prefix=f"edgefl-b8-{name}-{method}-") as tmp:
        result = run_local(cfg, Path(tmp) / "run", timeout_s=1800)
        if not result.ok:
            raise SystemExit(f"B8 run {name} {method} seed {seed} failed: {result.error}")
        return run_figures(result.metrics)


def _line(name: str, method: str, seed: int, f: dict[str, Any]) -> str:
    p, g, num = f["personal"], f["global"], _acc
    return (
        f"  {name} seed {seed} {method:<9}  personal mean {num(p['mean'])} p10 {num(p['p10'])} "
        f"worst {num(p['worst'])}  global mean {num(g['mean'])}  pooled {num(f['pooled_acc'])}"
        f"  ({f['devices']} devices, {f['wall_s'] or 0:.0f} s)"
    )


# --- report ------------------------------------------------------------------------------------


def dataset_table(s: dict[str, Any]) -> str:
    rows = []
    if s["fedavg_from"]:
        rows.append(
            [
                f"FedAvg global (of {s['fedavg_from']})",
                s["fedavg_global_mean"],
                s["fedavg_global_p10"],
                s["fedavg_worst"],
                s["fedavg_pooled_acc"],
                s["fedavg_global_mean"],
                None,
            ]
        )
    for m, f in s["methods"].items():
        label = {"local": "local only", "finetune": "FedAvg + fine-tuning"}.get(m, m)
        if m == s["best_method"]:
            label += " (best)"
        rows.append(
            [
                label,
                f["mean"],
                f["p10"],
                f["worst"],
                f["pooled_acc"],
                f["global_mean"],
                f["uplink_bytes_per_update"],
            ]
        )
    return table(
        [
            "on each device's held-out split",
            "mean",
            "p10",
            "worst",
            "pooled test",
            "its global, mean",
            "uplink B/update",
        ],
        rows,
    )


def report(summary: dict[str, dict[str, Any]], seeds: int, wall_s: float) -> str:
    parts = []
    for name, s in summary.items():
        if "skipped" in s:
            parts.append(f"{name}: skipped ({s['skipped']})")
            continue
        checks = "; ".join(
            f"{k}: {'-' if v is None else 'yes' if v else 'no'}" for k, v in targets_met(s).items()
        )
        parts.append(
            f"{name} ({DATASETS[name].relative_to(ROOT)}), medians of {seeds} seed(s); smallest "
            f"held-out split {s['smallest_holdout']} samples\n\n{dataset_table(s)}\n\n"
            f"best method {s['best_method']}: "
            f"{_signed(s['best_over_fedavg_points'])} points over FedAvg's global model, "
            f"{_signed(s['best_over_local_points'])} over local-only\n{checks}"
        )
    return (
        "B8: personalisation; accuracies on each device's own held-out split (mean, 10th "
        "percentile, worst device), and the global model on the pooled test set\n\n"
        + "\n\n".join(parts)
        + f"\n\nwhole benchmark: {wall_s:.0f} s"
    )


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}"


def _parse_list(text: str, known: Sequence[str], what: str, p: argparse.ArgumentParser) -> list:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        p.error(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="override the configs' rounds")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--save", default=None, help="results name (a full run saves b8_personal)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="change a setting of every run, e.g. personal.ditto_lambda=0.5 (repeatable)",
    )
    args = p.parse_args(argv)
    from edgefl.config import merge

    settings: dict[str, Any] = {}
    for text in args.set:
        try:
            settings = merge(settings, parse_setting(text))
        except ValueError as e:
            p.error(str(e))
    names = _parse_list(args.datasets, list(DATASETS), "data sets", p)
    methods = _parse_list(args.methods, METHODS, "methods", p)

    started = time.perf_counter()
    summary: dict[str, dict[str, Any]] = {}
    detail: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in names:
        why = missing_data(name)
        if why:
            print(f"B8 {name}: skipped, its data set is not installed: {why}", flush=True)
            summary[name] = {"skipped": why}
            continue
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for seed in range(args.seeds):
            # methods alternate within a seed, so that drifting machine load hits them alike
            for method in methods:
                f = one_run(name, method, seed, args.rounds, settings)
                print(_line(name, method, seed, f), flush=True)
                runs[method].append(f)
        detail[name] = runs
        summary[name] = dataset_summary(runs)
        summary[name]["targets"] = targets_met(summary[name])
    wall_s = time.perf_counter() - started

    text = report(summary, args.seeds, wall_s)
    print(text)
    full = (
        set(names) == set(DATASETS)
        and set(methods) == set(METHODS)
        and not args.rounds
        and args.seeds >= 3
        and not args.set
    )
    save = args.save or ("b8_personal" if full else None)
    result = {"datasets": summary, "settings": settings}
    if save:
        write_results(save, {**result, "seeds": args.seeds, "wall_s": wall_s, "runs": detail}, text)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
