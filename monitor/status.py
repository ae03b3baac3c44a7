"""``edgefl status``: the fleet on one screen, from what the broker retains (monitor/fleet.py).

:func:`gather` connects, waits briefly for the retained messages and returns the snapshot;
:func:`render` turns a snapshot into the screen: the aggregator (mode, round or model version,
reported of expected, whom it waits for and until when, accuracy, bytes, rejections) and one
line per device (online or not, last seen, battery, the agent's own CPU and memory, link,
samples, the model it serves, rounds it took part in, updates rejected). :func:`watch` redraws
it every few seconds. This is the command's own code, so it writes to the stream it is given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

from edgefl.config import BrokerConfig
from monitor.fleet import FleetView

# the retained messages come right after the broker acknowledged the subscriptions; this long
# without a new one once the aggregator's status is in means they are all in
QUIET_S = 0.3
CLEAR = "\x1b[H\x1b[2J"


def settle(view: FleetView, wait_s: float) -> None:
    """Wait up to ``wait_s`` for the retained state: return early once the aggregator's status
    is in and nothing new came for QUIET_S."""
    deadline = time.monotonic() + wait_s
    seen = view.generation
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        now = view.wait_change(seen, min(left, QUIET_S))
        if now == seen and view.snapshot()["aggregator"] is not None:
            return
        seen = now


def gather(
    fleet: str, broker: BrokerConfig, *, enrolled: Iterable[str] = (), wait_s: float = 1.0
) -> dict[str, Any]:
    """The fleet's snapshot (FleetView.snapshot) after waiting up to ``wait_s`` for the
    retained state; raises edgefl.mqtt.BrokerUnavailable if the broker cannot be reached or
    refuses the account."""
    with FleetView(fleet, broker, enrolled=enrolled) as view:
        settle(view, wait_s)
        return view.snapshot()


# -- the screen -------------------------------------------------------------------------------


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    s = max(0.0, now - ts)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h ago"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _names(ids: list[str], more: int = 0) -> str:
    return ", ".join(ids) + (f" and {more} more" if more else "")


def _aggregator_lines(
    agg: dict[str, Any] | None, devices: dict[str, Any], now: float
) -> list[str]:
    if agg is None:
        return ["aggregator: no status on the broker (never started, or another fleet name?)"]
    if agg["state"] == "offline" and not agg["rounds"]:
        # its Last Will: a bare "offline" (a clean stop says where it stood, rounds included)
        return [f"aggregator: offline: lost without a goodbye (its Last Will), "
                f"{_ago(agg['ts'], now)}; the devices' lines below are what the broker kept"]
    mode = agg["mode"]
    if mode == "async":
        where = f"model v{agg['model_version']}, buffer {agg['round']}"
        if agg["rounds"]:
            where += f" (run makes {agg['rounds']} versions)"
        progress = f"{agg['reported']} of {agg['expected']} updates in the buffer"
    else:
        total = agg["rounds"]
        if agg["round"]:
            where = f"round {agg['round']}" + (f" of {total}" if total else "")
        else:
            where = "no round yet" + (f" ({total} to run)" if total else "")
        where += f", model v{agg['model_version']}"
        progress = f"{agg['reported']} of {agg['expected']} reported"
    state = agg["state"]
    first = f"aggregator: {state}, {mode}, {where}"
    if state == "online" and agg["expected"]:
        first += f": {progress}"
    lines = [first]
    # whom it waits for, and which of them the broker says are gone (their Will)
    waited = [d + (" (offline)" if devices.get(d, {}).get("state") == "offline" else "")
              for d in agg["missing"]]
    waiting, missing = agg["waiting_for"], _names(waited, agg["missing_more"])
    if state != "online":
        nxt = {"finished": "training is over", "offline": "stopped (or lost)"}[state]
        nxt += f"; last status {_ago(agg['ts'], now)}"
    elif waiting == "devices":
        nxt = f"waiting for devices to come online before round 1: {missing or '-'}"
    elif waiting == "eligible":
        nxt = f"no device can take part; waiting for {missing or 'any device'}"
    elif waiting == "updates":
        nxt = f"waiting for updates from {missing or '-'}"
        if agg["deadline"]:
            left = agg["deadline"] - now
            at = datetime.fromtimestamp(agg["deadline"]).strftime("%H:%M:%S")
            nxt += f" until {at} ({left:.0f} s)" if left > 0 else f" (deadline {at} passed)"
    else:
        nxt = "between rounds" if agg["round"] else "starting"
    lines.append(f"  next: {nxt}")
    acc = _num(agg["accuracy"], ".4f")
    lines.append(
        f"  accuracy {acc}; bytes up {_bytes(agg['uplink_bytes'])}, down "
        f"{_bytes(agg['downlink_bytes'])}; {agg['online']} devices online as it sees them"
    )
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(agg["rejected"].items())) or "none"
    lines.append(f"  updates rejected: {rejected}; quarantined: "
                 f"{_names(agg['quarantined']) or 'none'}")
    return lines


COLUMNS = ("DEVICE", "STATE", "LAST SEEN", "BATTERY", "AGENT CPU", "AGENT MEM", "LINK",
           "SAMPLES", "MODEL", "ROUNDS", "REJECTED")


def _device_row(device_id: str, d: dict[str, Any], now: float) -> tuple[str, ...]:
    t = d["telemetry"] or {}
    battery = _num(t.get("battery_percent"), ".0f", "%")
    if t.get("charging"):
        battery += " charging"
    link = t.get("link_kbps")
    model = "-" if d["serving"] is None else f"v{d['serving']}"
    if d["serving"] is not None and d["serving_variant"]:
        model += f" {d['serving_variant']}"
    training = d["training"] or {}
    rounds = "-"
    if training:
        rounds = f"{training.get('rounds', 0)}/{training.get('assigned', 0)}"
    return (
        device_id,
        d["state"],
        _ago(d["last_seen"], now),
        battery,
        _num(t.get("agent_cpu_percent"), ".0f", "%"),
        _num(t.get("agent_rss_mb"), ".0f", " MB"),
        "-" if link is None else (f"{link / 1000:.1f} Mbit/s" if link >= 1000 else
                                  f"{link:.0f} kbit/s"),
        _num(t.get("samples"), "d"),
        model,
        rounds,
        str(training.get("rejected", 0)) if training else "-",
    )


def render(snap: dict[str, Any], now: float | None = None) -> str:
    """The screen for a snapshot, as text (no colours: it may go to a file or a log)."""
    now = time.time() if now is None else now
    c = snap["counts"]
    head = (
        f"fleet {snap['fleet']}: {len(snap['devices'])} devices, {c['online']} online, "
        f"{c['offline']} offline, {c['unknown']} never seen"
        f"  ({datetime.fromtimestamp(snap['taken_at']).strftime('%H:%M:%S')}"
        f"{'' if snap['connected'] else ', not connected to the broker'})"
    )
    lines = [head, *_aggregator_lines(snap["aggregator"], snap["devices"], now), ""]
    rows = [COLUMNS] + [_device_row(k, v, now) for k, v in snap["devices"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    if len(rows) == 1:
        lines.append("(no device has announced itself, and no enrolled list names any)")
    lines.append("ROUNDS: rounds it contributed an update to / rounds it was asked to work in")
    if snap["invalid"]:
        bad = ", ".join(f"{k} {v}" for k, v in sorted(snap["invalid"].items()))
        lines.append(f"skipped invalid messages: {bad}")
    return "\n".join(lines)


def show(snap: dict[str, Any], out: TextIO, as_json: bool = False) -> None:
    out.write((json.dumps(snap, indent=1, sort_keys=True) if as_json else render(snap)) + "\n")
    out.flush()


def watch(
    fleet: str,
    broker: BrokerConfig,
    out: TextIO,
    *,
    every_s: float,
    enrolled: Iterable[str] = (),
    wait_s: float = 1.0,
    as_json: bool = False,
    clear: bool = False,
    count: int | None = None,
) -> None:
    """Redraw every ``every_s`` seconds (``count`` times; None: until KeyboardInterrupt) from
    one connection that stays up; ``clear`` clears the terminal before each screen."""
    with FleetView(fleet, broker, enrolled=enrolled) as view:
        settle(view, wait_s)
        shown = 0
        while count is None or shown < count:
            if shown:
                time.sleep(every_s)
            if clear:
                out.write(CLEAR)
            show(view.snapshot(), out, as_json)
            shown += 1
