"""Where B1's coordination time goes, phase by phase.

Runs B1 (docs/benchmarks.md) through the real programs, ``--repeats`` times at 5 local epochs
and at 1, and splits each round's wall time into the aggregator's phases (as it records them in
every round's metrics: ``phases``) and what happens between them on the devices and the broker:

  plan           the scheduler picks participants and sizes their work
  tasks          the aggregator publishes the tasks (and the retained status)
  delivery       from the round's opening to the first device starting to train
  stagger        from the first device starting to the last: simulated devices queueing for
                 this machine's 2 cores (real devices each have their own)
  training       from the last start to the last device finishing
  upload         from the last device finishing to its update folded in
  wake ... status  the aggregator's close: waking up, combining, bookkeeping, optimiser,
                 evaluation, metrics, checkpoint, publishing the model and its status

Coordination is the round's wall time minus the slowest device's training time. Medians over
the rounds of all repeats; the table in ms, the last line JSON.

    python -m benchmarks.coordination [--repeats 3] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import machine, median, table, write_results
from edgefl.config import RunConfig, load
from launch.local import run_local

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "b1.toml"
CLOSE = ["wake", "aggregate", "bookkeeping", "optimiser", "evaluate", "metrics", "checkpoint",
         "publish_model", "status"]


def phases(r: dict[str, Any]) -> dict[str, float]:
    """One round's phases in seconds; the device-side ones from its timeline."""
    p, tl = r["phases"], r["timeline"]
    out = {"plan": p["plan"], "tasks": p["tasks"]}
    if "start_last" in tl and "end_last" in tl:
        out["delivery"] = tl["start_first"]
        out["stagger"] = tl["start_last"] - tl["start_first"]
        out["training"] = max(0.0, tl["end_last"] - tl["start_last"])
        out["upload"] = max(0.0, r["last_update_s"] - tl["end_last"])
    out.update({k: p[k] for k in CLOSE if k in p})
    out["wall"] = r["wall_s"]
    out["coordination"] = r["coordination_s"]
    return out


def run(cfg: RunConfig, repeats: int, label: str) -> dict[str, float]:
    rows: list[dict[str, float]] = []
    for i in range(repeats):
        print(f"  {label}: run {i + 1}/{repeats} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="edgefl-coord-") as tmp:
            result = run_local(cfg, Path(tmp) / "run")
            if not result.ok:
                raise SystemExit(f"run failed: {result.error}")
            rows += [phases(r) for r in result.metrics["rounds"] if r.get("phases")]
    keys = list(rows[0])
    return {k: median([r.get(k) for r in rows]) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--save", default="coordination", help="results file name")
    args = p.parse_args(argv)
    settings = {}
    for epochs in (5, 1):
        cfg = load(RunConfig, CONFIG, {"rounds": {"rounds": args.rounds},
                                       "train": {"epochs": epochs}})
        settings[f"{epochs} epoch{'s' if epochs > 1 else ''}"] = run(cfg, args.repeats,
                                                                     f"{epochs} epochs")
    names = list(next(iter(settings.values())))
    text = table(["phase (ms, median)", *settings],
                 [[n, *(1000 * s[n] if s.get(n) is not None else None for s in settings.values())]
                  for n in names])
    print(text)
    figures = {"phases_ms": {label: {k: 1000 * v for k, v in s.items() if v is not None}
                             for label, s in settings.items()},
               "repeats": args.repeats, "rounds": args.rounds, "machine": machine()}
    write_results(args.save, figures, text)
    print(json.dumps({label: {"coordination_ms": round(1000 * s["coordination"], 1),
                              "wall_ms": round(1000 * s["wall"], 1)}
                      for label, s in settings.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
