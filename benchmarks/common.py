"""What every benchmark shares: machine facts, medians, tables, and writing results."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The processor's name: machines of one kind differ in it, and figures with it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _cpu_flags() -> str:
    """The vector extensions that decide which kernels torch and ONNX Runtime pick."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))]
    flags = lines[0].split(":", 1)[1].split() if lines else []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd")
    return " ".join(f for f in wanted if f in flags)


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def write_results(name: str, figures: dict[str, Any], text: str) -> Path:
    """benchmarks/results/<name>.json (figures + machine) and <name>.md (the printed table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": info, **figures}, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(
        f"# {name}\n\nMeasured {info['date']} on {info['cores']} cores ({info['cpu']}; "
        f"{info['cpu_flags']}), {info['memory_gib']} GiB, Python {info['python']}, "
        f"torch {info['torch']}.\n\n"
        f"```\n{text}\n```\n"
    )
    return path
