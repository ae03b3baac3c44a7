"""The run report: what a local run's ``metrics.json`` holds, drawn and tabulated.

``write_report`` turns the figures of one run into files beside ``metrics.json``:

    accuracy.png       test accuracy per round
    bytes.png          bytes up (updates) and down (tasks, models) per round
    participation.png  which device reported in which round (or missed it, or withdrew)
    energy.png         the devices' estimated energy per round
    timeline.png       where each round's time went, phase by phase
    report.html        all of the above and the tables, in one self-contained page: the
                       images are inlined as base64, nothing is fetched from anywhere

``per_device`` builds the per-device table (rounds taken part in, updates rejected, samples,
bytes sent) that metrics.json keeps and the demo's closing summary prints.

Without matplotlib the page has its tables only (and says so).
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# the charts, in the order the page shows them: (file stem, section title)
CHARTS = (
    ("accuracy", "Accuracy per round"),
    ("bytes", "Bytes up and down per round"),
    ("participation", "Participation per device"),
    ("energy", "Energy per round"),
    ("timeline", "Round timeline"),
)
# the phases of a synchronous round's opening (aggregator/service.py); the wait for the
# devices' updates follows, then the close, whose phases each record names in their order
OPENING = ("plan", "tasks")
# devices shown by name in the participation chart; a larger fleet is drawn without labels
LABELLED_DEVICES = 40


def per_device(
    rounds: list[dict[str, Any]],
    aggregator: Mapping[str, Mapping[str, int]],
    processes: Mapping[str, Mapping[str, Any]],
    samples: Mapping[str, int],
) -> dict[str, dict[str, int]]:
    """Per device: rounds (asynchronous mode: buffers) its updates went into, updates the
    aggregator refused, local samples, bytes of updates it sent. ``aggregator`` is the
    ``devices`` table of the aggregator's summary.json, ``processes`` the device processes'
    figures (``devices-N.json``), ``samples`` the data split."""
    ids = set(samples) | set(aggregator)
    sent: dict[str, int] = {}
    for proc in processes.values():
        for device_id, hw in (proc.get("hardware") or {}).items():
            sent[device_id] = int(hw.get("uplink_bytes", 0))
            ids.add(device_id)
    taken: dict[str, int] = {}
    for r in rounds:
        for device_id in r.get("reporters", []):
            taken[device_id] = taken.get(device_id, 0) + 1
    return {
        d: {
            "rounds": taken.get(d, 0),
            "rejected": int((aggregator.get(d) or {}).get("rejected", 0)),
            "samples": int(samples.get(d, 0)),
            "uplink_bytes": sent.get(d, 0),
        }
        for d in sorted(ids)
    }


def device_table(devices: Mapping[str, Mapping[str, int]], rounds: int, limit: int = 0
                 ) -> list[str]:
    """The per-device table as text lines; ``limit`` > 0 keeps that many rows and counts the
    rest."""
    rows = list(devices.items())
    shown = rows[:limit] if limit > 0 else rows
    width = max([len("device"), *(len(d) for d, _ in shown)])
    lines = [f"{'device':<{width}}  {'rounds':>9}  {'rejected':>8}  {'samples':>7}  "
             f"{'sent':>10}"]
    for device_id, f in shown:
        lines.append(
            f"{device_id:<{width}}  {str(f['rounds']) + '/' + str(rounds):>9}  {f['rejected']:>8}  "
            f"{f['samples']:>7}  {_kib(f['uplink_bytes']):>10}"
        )
    if len(rows) > len(shown):
        lines.append(f"... and {len(rows) - len(shown)} more devices (report.html has them all)")
    return lines


def write_report(metrics: Mapping[str, Any], run_dir: Path) -> Path:
    """The charts as PNG files and report.html in ``run_dir``; the page's path."""
    images: dict[str, bytes] = {}
    try:
        images = draw(metrics, run_dir)
    except ImportError:
        log.warning("matplotlib is not installed; the run report has no charts")
    page = run_dir / "report.html"
    page.write_text(render(metrics, images))
    return page


def draw(metrics: Mapping[str, Any], run_dir: Path) -> dict[str, bytes]:
    """Every chart that has something to show, written as ``<stem>.png``; their bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics.get("rounds") or []
    if not rounds:
        return {}
    asynchronous = rounds[0].get("mode") == "async"
    xlabel = "buffer applied" if asynchronous else "round"
    xs = [r["round"] for r in rounds]
    out: dict[str, bytes] = {}

    def save(stem: str, fig: Any) -> None:
        fig.tight_layout()
        path = run_dir / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        out[stem] = path.read_bytes()

    accs = [(x, r["accuracy"]) for x, r in zip(xs, rounds, strict=True)
            if r["accuracy"] is not None]
    if accs:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        ax.plot(*zip(*accs, strict=True), marker="o", ms=3)
        ax.set(xlabel=xlabel, ylabel="test accuracy", ylim=(0, 1), title=_title(metrics))
        ax.grid(alpha=0.3)
        save("accuracy", fig)

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    kib = 1024
    ax.plot(xs, [r["uplink_bytes"] / kib for r in rounds], marker="o", ms=3,
            label="up (updates)")
    ax.plot(xs, [r["downlink_bytes"] / kib for r in rounds], marker="s", ms=3,
            label="down (tasks, models)")
    ax.set(xlabel=xlabel, ylabel="KiB", title="bytes per round, whole fleet")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    save("bytes", fig)

    devices = sorted(metrics.get("devices") or {})
    if devices:
        save("participation", _participation(plt, rounds, devices, xlabel))

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.bar(xs, [r.get("energy_j", 0.0) for r in rounds], color="tab:orange")
    ax.set(xlabel=xlabel, ylabel="J", title="devices' energy per round (estimated)")
    ax.grid(alpha=0.3, axis="y")
    save("energy", fig)

    save("timeline", _timeline(plt, rounds, xlabel))
    return out


def _participation(plt: Any, rounds: list[dict[str, Any]], devices: list[str],
                   xlabel: str) -> Any:
    """A device x round grid: 3 reported, 2 withdrew (declined, late), 1 asked but missing,
    0 not asked."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    row = {d: i for i, d in enumerate(devices)}
    grid = np.zeros((len(devices), len(rounds)))
    for j, r in enumerate(rounds):
        for value, ids in ((1, r.get("missing", [])), (2, r.get("withdrawn", {})),
                           (3, r.get("reporters", []))):
            for d in ids:
                if d in row:
                    grid[row[d], j] = value
    colours = ["#f4f4f4", "#d62728", "#ff9f40", "#2ca02c"]
    height = min(12.0, 1.5 + 0.22 * len(devices))
    fig, ax = plt.subplots(figsize=(7, height), dpi=120)
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(colours),
              vmin=0, vmax=3)
    if len(devices) <= LABELLED_DEVICES:
        ax.set_yticks(range(len(devices)), devices, fontsize=7)
    else:
        ax.set_ylabel(f"{len(devices)} devices")
        ax.set_yticks([])
    step = max(1, len(rounds) // 15)
    ax.set_xticks(range(0, len(rounds), step), [rounds[j]["round"] for j in
                                                range(0, len(rounds), step)])
    # thin white lines between the cells, so that neighbouring rounds can be told apart
    ax.set_xticks(np.arange(-0.5, len(rounds)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(devices)), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set(xlabel=xlabel, title="which device reported in which round")
    labels = ("not asked", "missing", "withdrew", "reported")
    ax.legend(handles=[Patch(color=c, label=t) for c, t in zip(colours, labels, strict=True)],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    return fig


def _timeline(plt: Any, rounds: list[dict[str, Any]], xlabel: str) -> Any:
    """Each round's wall time as stacked phases: the opening (plan, tasks; synchronous mode),
    the wait for the devices' updates (to the last one accepted; in asynchronous mode since the
    previous buffer was applied), then the aggregator's phases of the close in their order."""
    import numpy as np

    opening = () if rounds[0].get("mode") == "async" else OPENING
    closing: list[str] = []  # every phase the records name, in the order they happened
    for r in rounds:
        closing += [k for k in r.get("phases") or {} if k not in opening and k not in closing]
    parts: dict[str, list[float]] = {"opening": [], "waiting for updates": []}
    parts.update({name.replace("_", " "): [] for name in closing})
    for r in rounds:
        phases = r.get("phases") or {}
        opened = sum(phases.get(k, 0.0) for k in opening)
        parts["opening"].append(opened)
        parts["waiting for updates"].append(max(0.0, r.get("last_update_s", 0.0) - opened))
        for name in closing:
            parts[name.replace("_", " ")].append(phases.get(name, 0.0))
    xs = np.arange(len(rounds))
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    bottom = np.zeros(len(rounds))
    cmap = plt.get_cmap("tab20")
    for i, (name, values) in enumerate(parts.items()):
        if not any(values):
            continue
        ax.bar(xs, values, bottom=bottom, label=name, color=cmap(i % 20), width=0.8)
        bottom += np.asarray(values)
    step = max(1, len(rounds) // 15)
    ax.set_xticks(xs[::step], [r["round"] for r in rounds][::step])
    ax.set(xlabel=xlabel, ylabel="s", title="where each round's time went")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def render(metrics: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """report.html: one page, its images inlined, no external resource."""
    esc = html.escape
    rounds = metrics.get("rounds") or []
    devices = metrics.get("devices") or {}
    final = metrics.get("final_acc")
    onnx = metrics.get("onnx") or {}
    summary = [
        ("final test accuracy", "-" if final is None else f"{final:.4f}"),
        ("rounds", str(len(rounds))),
        ("devices", str(len(devices))),
        ("wall time", _seconds(metrics.get("wall_s"))),
        ("start-up", _seconds(metrics.get("startup_s"))),
        ("uplink per device-round", _kib(metrics.get("uplink_bytes_per_device_round", 0))),
        ("downlink per device-round", _kib(metrics.get("downlink_bytes_per_device_round", 0))),
        ("updates rejected", ", ".join(f"{k} {v}" for k, v in
                                       sorted((metrics.get("rejected") or {}).items())) or "none"),
    ]
    if onnx:
        summary.append(("ONNX model", f"{_kib(onnx.get('bytes', 0))}, parity with PyTorch "
                                      f"{onnx.get('parity_max_abs', 0):.2e}"))
    body = [f"<h1>{esc(_title(metrics))}</h1>", '<section id="summary"><h2>Summary</h2>',
            _table(None, summary), "</section>"]
    for stem, title in CHARTS:
        body.append(f'<section id="{stem}"><h2>{esc(title)}</h2>')
        if stem in images:
            data = base64.b64encode(images[stem]).decode("ascii")
            body.append(f'<img alt="{esc(title)}" src="data:image/png;base64,{data}">')
        else:
            body.append("<p>No chart (nothing to show, or matplotlib is not installed).</p>")
        body.append("</section>")
    n = len(rounds)
    body.append('<section id="devices"><h2>Devices</h2>')
    body.append(_table(
        ["device", "rounds taken part in", "updates rejected", "samples", "bytes sent"],
        [(d, f"{f['rounds']}/{n}", str(f["rejected"]), str(f["samples"]),
          _kib(f["uplink_bytes"])) for d, f in devices.items()],
        row_class="device",
    ))
    body.append("</section>")
    body.append('<section id="rounds"><h2>Rounds</h2>')
    body.append(_table(
        ["round", "reported", "closed by", "accuracy", "up", "down", "energy", "wall"],
        [(str(r["round"]), f"{r['reported']}/{r['participants']}", r["closed_by"],
          "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}", _kib(r["uplink_bytes"]),
          _kib(r["downlink_bytes"]), f"{r.get('energy_j', 0.0):.2f} J", _seconds(r["wall_s"]))
         for r in rounds],
    ))
    body.append("</section>")
    return PAGE.format(title=esc(_title(metrics)), body="\n".join(body))


def _table(header: list[str] | None, rows: list[tuple[str, ...]], row_class: str = "") -> str:
    esc = html.escape
    cls = f' class="{row_class}"' if row_class else ""
    lines = ["<table>"]
    if header:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        lines.append(f"<thead><tr>{head}</tr></thead>")
    lines.append("<tbody>")
    for row in rows:
        cells = "".join(f"<td>{esc(str(c))}</td>" for c in row)
        lines.append(f"<tr{cls}>{cells}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _title(metrics: Mapping[str, Any]) -> str:
    cfg = metrics.get("config") or {}
    devices = (cfg.get("demo") or {}).get("devices", "?")
    model = (cfg.get("model") or {}).get("name", "?")
    codec = (cfg.get("codec") or {}).get("name", "?")
    return f"edgefl: {devices} devices, {model}, {codec}"


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f} s"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head>
<body>
{body}
</body></html>
"""
