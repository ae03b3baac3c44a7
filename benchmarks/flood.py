"""The flood of docs/benchmarks.md: one hostile device against its neighbours.

A fleet of real agents and the aggregator, started as ``edgefl demo`` starts them (private
Mosquitto from broker/'s configuration, ``edgefl aggregator`` and ``edgefl device`` processes,
enrolled devices only). One more enrolled device account is the attacker: with its own
credentials, on its own topics, one paho publisher sends as fast as it can

- ``junk``: 1 KB of zeros on its update topic,
- ``stale``: copies of a real update of its own (dense fp32, built by the agent's encoder for
  round 1: each copy is a valid envelope for a round long closed),
- ``limit``: payloads just under the broker's packet limit,

each at QoS 0 and at QoS 1, for ``--seconds`` (30) each, after a clean window of the same length
in the same run. A persistent attacker: when the broker cuts it off it keeps trying to log in.
Between cases the operator re-admits it (``edgefl readmit``'s command).

Per window: rounds completed and their median time, against the clean window; honest updates
lost (participants that did not report); the median round time from 10 s after the flood's start
against clean; time from the flood's start to the broker closing the flooder's connection;
messages it got out; broker and aggregator peak RSS (sampled every 0.1 s); the aggregator's and
the broker's log growth in bytes per second. The last line is JSON.

    python -m benchmarks.flood [--seconds 30] [--devices 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from aggregator.enrolled import LIST_FILE, add_ids
from benchmarks.common import machine, median, table, write_results
from device.updates import UpdateEncoder
from edgefl import dynsec
from edgefl.config import RunConfig, load
from edgefl.messages import GlobalModel, Task
from edgefl.models import build_model, get_weights
from launch.local import LocalRun, run_local

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "b1.toml"
HOSTILE = "dev-hostile"
CASES = [(kind, qos) for kind in ("junk", "stale", "limit") for qos in (0, 1)]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler:
    """Peak RSS of some processes over a window, sampled every 0.1 s."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], _rss_mb(pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Flooder:
    """One paho publisher with the hostile device's credentials, as fast as it goes; when the
    broker closes its connection it notes the time and keeps trying to log in again."""

    def __init__(self, run: LocalRun, password: str, payload: bytes, qos: int) -> None:
        self.run, self.payload, self.qos = run, payload, qos
        self.topic = f"edgefl/{run.broker.fleet}/devices/{HOSTILE}/update"
        self.password = password
        self.sent = 0
        self.cut_off_at: float | None = None
        self.refused_logins = 0

    def _client(self) -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=HOSTILE,
                        protocol=paho.MQTTv5)
        c.username_pw_set(HOSTILE, self.password)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(1000)
        return c

    def flood(self, seconds: float) -> float:
        """Flood until ``seconds`` pass; returns the start time (monotonic)."""
        started = time.monotonic()
        end = started + seconds
        while time.monotonic() < end:
            c = self._client()
            gone = threading.Event()
            c.on_disconnect = lambda *_a, gone=gone: gone.set()
            try:
                rc = c.connect(self.run.broker.host, self.run.broker.port, keepalive=30)
            except OSError:
                rc = -1
            if rc != 0:
                time.sleep(0.2)
                continue
            c.loop_start()
            deadline = time.monotonic() + 2
            while not c.is_connected() and not gone.is_set() and time.monotonic() < deadline:
                time.sleep(0.005)
            if not c.is_connected():
                self.refused_logins += 1
                c.loop_stop()
                time.sleep(0.2)
                continue
            while not gone.is_set() and time.monotonic() < end:
                info = c.publish(self.topic, self.payload, qos=self.qos)
                if info.rc == paho.MQTT_ERR_SUCCESS:
                    self.sent += 1
                elif info.rc == paho.MQTT_ERR_QUEUE_SIZE:
                    time.sleep(0.001)  # QoS 1: as fast as the PUBACKs come back
            if gone.is_set() and self.cut_off_at is None:
                self.cut_off_at = time.monotonic() - started
            c.loop_stop()
            c.disconnect()
        return started


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _window(run: LocalRun, seconds: float, flooder: Flooder | None) -> dict[str, Any]:
    """One window: clean if ``flooder`` is None. Round numbers from the aggregator's status."""
    logs = run.run_dir / "logs"
    agg_log, broker_log = logs / "aggregator.log", run.broker.log_path
    sizes = _log_size(agg_log), _log_size(broker_log)
    pids = {"broker": run.broker.pid, "aggregator": run.aggregator_pid}
    marks: dict[str, int] = {"start": run.round}
    timer = threading.Timer(10.0, lambda: marks.setdefault("after_10s", run.round))
    with Sampler(pids) as rss:
        timer.start()
        t0 = time.monotonic()
        if flooder is None:
            time.sleep(seconds)
        else:
            flooder.flood(seconds)
        elapsed = time.monotonic() - t0
    timer.cancel()
    marks["end"] = run.round
    marks.setdefault("after_10s", marks["end"])
    out: dict[str, Any] = {
        "rounds_from": marks["start"],
        "rounds_after_10s_from": marks["after_10s"],
        "rounds_to": marks["end"],
        "broker_peak_rss_mb": rss.peak["broker"],
        "aggregator_peak_rss_mb": rss.peak["aggregator"],
        "aggregator_log_bytes_per_s": (_log_size(agg_log) - sizes[0]) / elapsed,
        "broker_log_bytes_per_s": (_log_size(broker_log) - sizes[1]) / elapsed,
    }
    if flooder is not None:
        out.update(sent=flooder.sent, cut_off_s=flooder.cut_off_at,
                   refused_logins=flooder.refused_logins)
    return out


def _stale_update(model: str, workdir: Path) -> bytes:
    """A real update of the hostile device, as its agent's encoder builds it (dense fp32, as
    B1), for round 1 on model v0: every copy sent later is valid but long stale."""
    weights = get_weights(build_model(model, seed=0))
    rng = np.random.default_rng(0)
    trained = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in weights.items()}
    task = Task(round=1, base_version=0, epochs=5, batch_size=32, lr=0.1,
                codec={"name": "dense_fp32"}, deadline=time.time() + 60)
    encoder = UpdateEncoder(HOSTILE, workdir)
    return encoder.encode(task, GlobalModel(0, 0, model, weights), trained, 80,
                          {"train_s": 0.05, "samples_seen": 400.0, "steps": 15.0})


def flood_run(cfg: RunConfig, seconds: float, cases: list[tuple[str, int]]) -> dict[str, Any]:
    windows: dict[str, dict[str, Any]] = {}

    def during(run: LocalRun) -> None:
        hostile = run.broker.device_account(HOSTILE)
        add_ids(run.run_dir / LIST_FILE, [HOSTILE])  # an enrolled device, turned hostile
        admin = run.broker.broker_config(run.broker.admin)
        stale = _stale_update(cfg.model.name, run.run_dir / HOSTILE)
        limit = run.broker.max_packet_size - 1024
        payloads = {"junk": bytes(1024), "stale": stale, "limit": bytes(limit)}
        print(f"  clean window ({seconds:.0f} s) ...", flush=True)
        windows["clean"] = _window(run, seconds, None)
        for kind, qos in cases:
            name = f"{kind} qos{qos}"
            print(f"  {name}: {len(payloads[kind]):,} B messages for {seconds:.0f} s ...",
                  flush=True)
            flooder = Flooder(run, hostile.password, payloads[kind], qos)
            windows[name] = _window(run, seconds, flooder)
            windows[name]["message_bytes"] = len(payloads[kind])
            dynsec.send(admin, dynsec.readmit(HOSTILE))  # the operator lets it back in
            time.sleep(3)  # and the fleet settles

    with tempfile.TemporaryDirectory(prefix="edgefl-flood-") as tmp:
        result = run_local(cfg, Path(tmp) / "run", during=during, timeout_s=3600)
        if not result.ok:
            raise SystemExit(f"the flood run failed: {result.error}")
        rounds = result.metrics["rounds"]
        summary = json.loads((Path(tmp) / "run" / "aggregator" / "summary.json").read_text())
    by_number = {r["round"]: r for r in rounds}
    for w in windows.values():
        inside = [by_number[n] for n in range(w["rounds_from"] + 1, w["rounds_to"] + 1)
                  if n in by_number]
        late = [by_number[n] for n in range(w["rounds_after_10s_from"] + 1, w["rounds_to"] + 1)
                if n in by_number]
        w["rounds"] = len(inside)
        w["round_s_median"] = median([r["wall_s"] for r in inside])
        w["round_s_median_after_10s"] = median([r["wall_s"] for r in late])
        w["honest_lost"] = sum(len(r["missing"]) for r in inside)
        w["quarantined_in_rounds"] = sorted({d for r in inside for d in r.get("quarantined", [])})
    clean = windows["clean"]["round_s_median"]
    for w in windows.values():
        after = w["round_s_median_after_10s"]
        w["round_ratio_after_10s"] = after / clean if after and clean else None
    return {"windows": windows, "quarantines": summary.get("quarantined", {}),
            "rejected_by_kind": summary.get("rejected_by_kind", {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each window")
    p.add_argument("--devices", type=int, default=5, help="honest devices (at least 5)")
    p.add_argument("--cases", help="comma-separated, e.g. 'junk qos0,limit qos1' (default: all)")
    args = p.parse_args(argv)
    cases = CASES
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",")}
        cases = [(k, q) for k, q in CASES if f"{k} qos{q}" in wanted]
    cfg = load(RunConfig, CONFIG, {
        "rounds": {"rounds": 1_000_000, "deadline_s": 5.0},
        "demo": {"devices": args.devices, "device_processes": 1, "solo_device": False,
                 "telemetry_interval_s": 2.0},
    })
    print(f"flood: {args.devices} honest devices, {len(cases)} cases of {args.seconds:.0f} s",
          flush=True)
    out = flood_run(cfg, args.seconds, cases)
    windows = out["windows"]
    rows = [
        [name, w.get("message_bytes"), w.get("sent"), w.get("cut_off_s"), w["rounds"],
         w["round_s_median"], w["round_ratio_after_10s"], w["honest_lost"],
         w["broker_peak_rss_mb"], w["aggregator_peak_rss_mb"],
         w["aggregator_log_bytes_per_s"] + w["broker_log_bytes_per_s"]]
        for name, w in windows.items()
    ]
    text = table(
        ["window", "msg B", "sent", "cut off s", "rounds", "round s", "x clean >10s",
         "honest lost", "broker MB", "agg MB", "log B/s"],
        rows,
    )
    print(text)
    floods = [w for name, w in windows.items() if name != "clean"]
    figures = {
        "honest_lost_total": sum(w["honest_lost"] for w in floods),
        "worst_round_ratio_after_10s": max(
            (w["round_ratio_after_10s"] for w in floods if w["round_ratio_after_10s"]),
            default=None),
        "broker_peak_rss_mb": max(w["broker_peak_rss_mb"] for w in windows.values()),
        "aggregator_peak_rss_mb": max(w["aggregator_peak_rss_mb"] for w in windows.values()),
        "log_bytes_per_s_max": max(
            w["aggregator_log_bytes_per_s"] + w["broker_log_bytes_per_s"] for w in floods),
        # None if some flood was never cut off
        "time_to_quarantine_s_max": None if any(w["cut_off_s"] is None for w in floods)
        else max((w["cut_off_s"] for w in floods), default=None),
        "seconds": args.seconds,
        "devices": args.devices,
        "windows": windows,
        "machine": machine(),
    }
    write_results("flood", figures, text)
    print(json.dumps({k: v for k, v in figures.items() if k != "windows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
