"""A whole federated run on this machine: the programs of a deployment, started locally.

``run_local`` starts a private Mosquitto from broker/'s configuration, the aggregator service and
the device agents as separate processes (the same ``edgefl aggregator`` and ``edgefl device``
commands a deployment runs; several agents per process, each with its own MQTT connection),
follows the training over MQTT, and gathers a report in a run folder:

    runs/<time>/metrics.json    every figure of the run
    runs/<time>/report.html     the run report: charts and tables in one page (launch/report.py),
                                its charts also as PNGs (accuracy.png, bytes.png ...)
    runs/<time>/logs/           the log of every process, the broker's included
    runs/<time>/aggregator/     checkpoint, rounds.jsonl, exported ONNX models

``edgefl demo`` and the benchmarks both use it. One module, about 520 lines: preparing the data,
the broker, the processes, following the run and the report act on one run folder.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefl.atomic import write_atomic
from edgefl.config import (
    AggregatorConfig,
    BrokerConfig,
    ConfigError,
    DeviceConfig,
    RunConfig,
    to_dict,
    to_toml,
)
from edgefl.data import Dataset, PartitionError, load_split, partition, save_npz
from edgefl.data.split import device_table as data_table
from launch.report import device_table, per_device, write_report

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    ok: bool
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _write_toml(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(to_dict(obj)))
    return path


def prepare_data(cfg: RunConfig, data_dir: Path, device_ids: list[str]) -> dict[str, int]:
    """Load the data set ``[data]`` names, split it over the fleet and write one .npz per device,
    the held-out set (``test.npz``), and ``partition.json``: who holds how many samples of which
    class (and, for the watch set, which wearer; the test set's wearers are held out)."""
    d = cfg.data
    train, test = load_split(d)
    if d.partition == "natural":
        assert train.subjects is not None  # DataConfig allows natural for the watch set only
        subjects = sorted(set(train.subjects.tolist()))
        if len(subjects) != len(device_ids):
            raise ConfigError(
                f"data.partition 'natural' gives one device per wearer: the {d.dataset} training "
                f"set has {len(subjects)} wearers (subjects {subjects}; {d.test_subjects} are "
                f"held out for testing), so set demo.devices = {len(subjects)}, "
                f"not {len(device_ids)}"
            )
    try:
        parts = partition(
            train.y,
            len(device_ids),
            d.partition,
            d.alpha,
            d.seed,
            d.min_samples,
            subjects=train.subjects,
            shards_per_device=d.shards_per_device,
        )
    except PartitionError as e:  # the fix is a setting: name the run's own keys
        raise ConfigError(
            f"{e} (here: data.alpha = {d.alpha:g}, data.min_samples = {d.min_samples}, "
            f"demo.devices = {len(device_ids)}, data.partition = {d.partition!r})"
        ) from None
    by_id = dict(zip(device_ids, parts, strict=True))
    classes = int(max(train.y.max(), test.y.max())) + 1
    for device_id, idx in by_id.items():
        save_npz(data_dir / f"{device_id}.npz", Dataset(train.X[idx], train.y[idx]))
    devices = data_table(by_id, train.y, classes, train.subjects)
    sizes = {device_id: len(idx) for device_id, idx in by_id.items()}
    save_npz(data_dir / "test.npz", test)
    manifest = {
        "dataset": d.dataset,
        "partition": d.partition,
        "train_samples": len(train),
        "test_samples": len(test),
        "features": int(train.X.shape[1]),
        "classes": classes,
        "devices": devices,
    }
    if test.subjects is not None:
        manifest["test_subjects"] = sorted(set(test.subjects.tolist()))
    write_atomic(data_dir / "partition.json", json.dumps(manifest, indent=1) + "\n")
    return sizes


def _groups(ids: list[str], processes: int, solo: bool) -> list[list[str]]:
    """Agents per process; with ``solo`` the last device runs alone, to measure one agent."""
    rest, alone = (ids[:-1], [ids[-1:]]) if solo and len(ids) > 1 else (ids, [])
    n = max(1, min(processes, len(rest)))
    return [rest[i::n] for i in range(n) if rest[i::n]] + alone


# Before the first round the progress display says something at least this often (seconds).
STARTUP_QUIET_S = 5.0


class _Progress:
    """Prints the start-up (broker, devices coming online, the first round), then the round,
    devices reported, accuracy and bytes as the run goes."""

    def __init__(self, total_rounds: int, enabled: bool) -> None:
        self.total = total_rounds
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self.live = ""
        self._lock = threading.Lock()
        self._t0 = self._said_at = time.monotonic()
        self._online = 0  # devices online by their births, and the count last printed
        self._shown = -1

    def status(self, rnd: int, reported: int, expected: int) -> None:
        if not self.tty or expected == 0:
            return
        with self._lock:
            # in asynchronous mode: the buffer being filled, its updates of buffer_size
            self.live = f"  round {rnd:>3}/{self.total}: {reported:>3}/{expected} reported"
            sys.stdout.write("\r" + self.live.ljust(70))
            sys.stdout.flush()

    def round_done(self, m: dict[str, Any]) -> None:
        if not self.enabled:
            return
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.4f}"
        up = m["uplink_bytes"] / max(m["reported"], 1) / 1024
        down = m["downlink_bytes"] / max(m["participants"], 1) / 1024
        if m.get("mode") == "async":
            # a buffer applied: the version it made, its staleness, who was still training
            stale = m["buffer"].get("staleness", {})
            mean = sum(int(s) * n for s, n in stale.items()) / max(1, sum(stale.values()))
            line = (
                f"  v{m['model_version']:<4} {m['round']:>4}/{self.total}: {m['reported']:>3}"
                f" updates  staleness {mean:4.1f}  {m['buffer'].get('training', 0):>3} training"
                f"  acc {acc}  {m['wall_s'] * 1000:6.0f} ms  up {up:5.1f} KiB/update"
            )
        else:
            line = (
                f"  round {m['round']:>3}/{self.total}: {m['reported']:>3}/{m['participants']}"
                f" reported  acc {acc}  {m['wall_s'] * 1000:6.0f} ms"
                f"  up {up:5.1f} KiB/dev  down {down:5.1f} KiB/dev"
            )
        personal = m.get("personal") or {}
        if personal:
            # personalised models: the mean over the reporting devices' held-out data
            line += (
                f"  personal {personal['personal_acc']['mean']:.4f}"
                f" (global {personal['global_acc']['mean']:.4f})"
            )
        with self._lock:
            prefix = "\r" if self.tty else ""
            sys.stdout.write(prefix + line.ljust(70) + "\n")
            sys.stdout.flush()

    def devices_online(self, online: int, total: int) -> None:
        """Births seen so far; said at most once a second, and always when all are in."""
        now = time.monotonic()
        with self._lock:
            self._online = online
            if online == self._shown or (online < total and now - self._said_at < 1.0):
                return
            self._shown = online
        self.say(f"  devices online {online}/{total}")

    def still_starting(self, total: int) -> None:
        """A line at least every STARTUP_QUIET_S seconds until the first round opens, so that
        a slow start (agents import torch, load their data) never looks hung."""
        if time.monotonic() - self._said_at >= STARTUP_QUIET_S:
            self.say(
                f"  starting: {self._online}/{total} devices online after "
                f"{time.monotonic() - self._t0:.0f} s (the agents load torch and their data)"
            )

    def say(self, text: str) -> None:
        self._said_at = time.monotonic()
        if self.enabled:
            with self._lock:
                sys.stdout.write(("\r" if self.tty else "") + text.ljust(70) + "\n")
                sys.stdout.flush()


def run_local(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    progress: bool = False,
    timeout_s: float = 1800.0,
    during: Callable[[LocalRun], None] | None = None,
) -> RunResult:
    """Run the configured federated training end to end; see the module docstring.

    ``during``, if given, is called in a thread of its own once the first round has started,
    with the running fleet (:class:`LocalRun`): benchmarks inject floods and faults through it.
    When it returns the aggregator is stopped (SIGTERM, as systemd would), if it has not
    finished by itself; that stop is not an error."""
    from aggregator.enrolled import LIST_FILE, add_ids
    from broker import PrivateBroker
    from broker.limits import limits_for_model
    from edgefl.compression import WireError
    from edgefl.messages import AggregatorStatus, Status
    from edgefl.mqtt import MqttLink
    from edgefl.topics import Topics

    t0 = time.perf_counter()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir) if run_dir else Path(cfg.demo.runs_dir) / stamp
    run_dir = run_dir.resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = cfg.demo.devices
    device_ids = [f"dev-{i:0{max(2, len(str(n - 1)))}d}" for i in range(n)]
    show = _Progress(cfg.rounds.rounds, progress)
    topics = Topics(cfg.fleet)
    rounds = (
        f"{cfg.rounds.rounds} rounds"
        if cfg.rounds.mode == "sync"
        else f"asynchronous, {cfg.rounds.rounds} buffers of {cfg.rounds.buffer_size} updates"
    )
    show.say(
        f"edgefl: {n} devices, {rounds}, model {cfg.model.name}, "
        f"codec {cfg.codec.name}; run folder {run_dir}"
    )

    sizes = prepare_data(cfg, run_dir / "data", device_ids)
    procs: list[tuple[str, subprocess.Popen]] = []
    result = RunResult(ok=False, run_dir=run_dir)
    marks: dict[str, float] = {}

    # the packet limit follows the model, capped by [demo] max_packet_bytes as a managed
    # broker's would be; every client is told it (and Mosquitto's CONNACK says it too)
    limits = limits_for_model(
        cfg.model.name, cfg.deploy.chunk_bytes, max_packet_bytes=cfg.demo.max_packet_bytes
    )
    with PrivateBroker(
        cfg.fleet, workdir=run_dir / "broker", device_ids=device_ids, limits=limits
    ) as broker:
        marks["broker_up_s"] = time.perf_counter() - t0
        show.say(f"  broker up on {broker.host}:{broker.port} ({marks['broker_up_s']:.1f} s)")

        def client(account: Any) -> BrokerConfig:
            cap = cfg.demo.max_packet_bytes
            return replace(broker.broker_config(account), max_packet_bytes=cap)

        agg_cfg = AggregatorConfig(
            **cfg.federation(),
            broker=client(broker.aggregator),
            eval_data=str(run_dir / "data" / "test.npz"),
            state_dir=str(run_dir / "aggregator"),
        )
        agg_cfg.rounds.min_devices = n
        # the aggregator works with enrolled devices only, as in a deployment
        add_ids(run_dir / LIST_FILE, device_ids)
        agg_cfg.enrolled_devices = str(run_dir / LIST_FILE)
        agg_path = _write_toml(run_dir / "aggregator.toml", agg_cfg)
        device_paths = {}
        for i, device_id in enumerate(device_ids):
            dcfg = DeviceConfig(
                fleet=cfg.fleet,
                device_id=device_id,
                broker=client(broker.device_account(device_id)),
                data=str(run_dir / "data" / f"{device_id}.npz"),
                model=cfg.model,
                state_dir=str(run_dir / "devices" / device_id),
                telemetry_interval_s=cfg.demo.telemetry_interval_s,
                # the simulated fleet keeps the aggregator's battery floor
                battery_floor_pct=cfg.rounds.battery_floor_pct,
            )
            if cfg.profiles:
                dcfg.profile = cfg.profiles[i % len(cfg.profiles)]
            device_paths[device_id] = _write_toml(run_dir / "devices" / f"{device_id}.toml", dcfg)

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        groups = _groups(device_ids, cfg.demo.device_processes, cfg.demo.solo_device)
        for i, group in enumerate(groups):
            name = f"devices-{i}"
            cmd = [
                sys.executable,
                "-m",
                "launch",
                "--log-file",
                str(logs / f"{name}.log"),
                "device",
                "--stats-out",
                str(run_dir / f"{name}.json"),
            ]
            for device_id in group:
                cmd += ["--config", str(device_paths[device_id])]
            procs.append((name, _spawn(cmd, env, logs / f"{name}.out")))
        agg_cmd = [
            sys.executable,
            "-m",
            "launch",
            "--log-file",
            str(logs / "aggregator.log"),
            "aggregator",
            "--config",
            str(agg_path),
        ]
        aggregator = _spawn(agg_cmd, env, logs / "aggregator.out")
        marks["processes_started_s"] = time.perf_counter() - t0
        show.say(
            f"  starting {n} device agents in {len(groups)} processes, and the aggregator"
        )

        live = LocalRun(broker, run_dir, aggregator.pid)
        done_during = threading.Event()

        def run_during() -> None:
            try:
                assert during is not None
                during(live)
            except Exception:
                log.exception("the run's `during` step failed")
                result.error = "the run's `during` step failed; see the log"
            finally:
                done_during.set()

        # follow the run over MQTT, like any dashboard would
        def on_status(_topic: str, payload: bytes) -> None:
            st = AggregatorStatus.from_payload(payload)
            live.round = st.round
            if "aggregator_up_s" not in marks and st.state == "online":
                marks["aggregator_up_s"] = time.perf_counter() - t0
                show.say("  aggregator online")
            if st.expected and "first_round_s" not in marks:
                marks["first_round_s"] = time.perf_counter() - t0
                what = "round 1" if cfg.rounds.mode == "sync" else "training (asynchronous)"
                show.say(
                    f"  {what} started {marks['first_round_s']:.1f} s after start-up began"
                )
                if during is not None:
                    threading.Thread(target=run_during, name="during", daemon=True).start()
            show.status(st.round, st.reported, st.expected)

        monitor = MqttLink(
            f"edgefl-{cfg.fleet}-monitor", broker.broker_config(broker.monitor), clean_start=True
        )
        monitor.subscribe(f"edgefl/{cfg.fleet}/aggregator/status", on_status)
        births: set[str] = set()

        def on_device_status(topic: str, payload: bytes) -> None:
            parsed = topics.parse_device_topic(topic)
            try:
                online = bool(payload) and Status.from_payload(payload).state == "online"
            except WireError:
                return  # not ours to judge; the aggregator counts it
            if parsed is None:
                return
            (births.add if online else births.discard)(parsed[0])
            show.devices_online(len(births & set(device_ids)), n)

        monitor.subscribe(topics.all_devices("status"), on_device_status)
        rounds_file = run_dir / "aggregator" / "rounds.jsonl"
        seen = 0
        rounds: list[dict[str, Any]] = []
        stopped = False
        deadline = time.monotonic() + timeout_s
        try:
            with monitor:
                while aggregator.poll() is None and time.monotonic() < deadline:
                    if done_during.is_set() and not stopped:
                        aggregator.terminate()  # what `during` wanted is done
                        stopped = True
                    seen = _follow(rounds_file, seen, rounds, show)
                    if any(p.poll() is not None for _, p in procs):
                        raise RuntimeError(f"a device process stopped early; see {logs}")
                    if "first_round_s" not in marks:
                        show.still_starting(n)
                    time.sleep(0.1)
                _follow(rounds_file, seen, rounds, show)
                marks["aggregator_done_s"] = time.perf_counter() - t0
            if aggregator.returncode is None:
                raise RuntimeError(f"the run did not finish within {timeout_s:.0f} s")
            if aggregator.returncode != 0 and not (stopped and aggregator.returncode == 130):
                raise RuntimeError(
                    f"the aggregator exited with code {aggregator.returncode}; "
                    f"see {logs / 'aggregator.log'} and {logs / 'aggregator.out'}"
                )
        except Exception as e:
            result.error = str(e)
        finally:
            for _, p in procs:
                p.terminate()
            aggregator.terminate() if aggregator.poll() is None else None
            for _, p in [*procs, ("aggregator", aggregator)]:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
            _copy_broker_log(broker, logs)
    marks["total_s"] = time.perf_counter() - t0

    summary_path = run_dir / "aggregator" / "summary.json"
    agg_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    device_stats = {}
    for i, group in enumerate(groups):
        path = run_dir / f"devices-{i}.json"
        if path.exists():
            device_stats[f"devices-{i}"] = json.loads(path.read_text()) | {"devices": group}
    result.metrics = _metrics(cfg, agg_summary, device_stats, marks, sizes, groups)
    (run_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
    write_report(result.metrics, run_dir)
    result.ok = not result.error and bool(agg_summary.get("rounds"))
    if result.error:
        show.say(f"edgefl: run failed: {result.error}")
    return result


@dataclass
class LocalRun:
    """A running local fleet, as ``run_local``'s ``during`` step sees it."""

    broker: Any  # broker.PrivateBroker
    run_dir: Path
    aggregator_pid: int
    round: int = 0  # the aggregator's current round, from its retained status


def _spawn(cmd: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    """Start a process whose standard output and error (crashes included) go to ``out``."""
    with out.open("wb") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def _follow(path: Path, seen: int, rounds: list, show: _Progress) -> int:
    if not path.exists():
        return seen
    text = path.read_text()
    # only whole lines: the aggregator may be writing the last one as we read
    lines = text[: text.rfind("\n") + 1].splitlines()
    for line in lines[seen:]:
        if line.strip():
            m = json.loads(line)
            rounds.append(m)
            show.round_done(m)
    return len(lines)


def _copy_broker_log(broker: Any, logs: Path) -> None:
    try:
        (logs / "mosquitto.log").write_bytes(Path(broker.log_path).read_bytes())
    except OSError:
        pass


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _metrics(
    cfg: RunConfig,
    agg: dict[str, Any],
    devices: dict[str, Any],
    marks: dict[str, float],
    sizes: dict[str, int],
    groups: list[list[str]],
) -> dict[str, Any]:
    rounds = agg.get("rounds", [])
    reported = sum(r["reported"] for r in rounds)
    asked = sum(r["participants"] for r in rounds)
    solo = None
    if cfg.demo.solo_device and len(groups) > 1 and len(groups[-1]) == 1:
        solo = devices.get(f"devices-{len(groups) - 1}")
    final = rounds[-1]["accuracy"] if rounds else None
    return {
        "config": to_dict(cfg),
        "final_acc": final,
        "acc_by_round": [r["accuracy"] for r in rounds],
        # personalised models: the last round's figures (every round's are in "rounds")
        "personal": rounds[-1].get("personal") if rounds else None,
        "rounds": rounds,
        "wall_s": marks.get("total_s"),
        "startup_s": marks.get("first_round_s"),
        "rounds_wall_s": sum(r["wall_s"] for r in rounds),
        "round_wall_s_median": _median([r["wall_s"] for r in rounds]),
        "device_compute_s_per_round_median": _median([r["train_s_max"] for r in rounds]),
        "coordination_s_per_round": _median([r["coordination_s"] for r in rounds]),
        "uplink_bytes_per_device_round": sum(r["uplink_bytes"] for r in rounds) / max(reported, 1),
        "downlink_bytes_per_device_round": sum(r["downlink_bytes"] for r in rounds) / max(asked, 1),
        "rejected": agg.get("rejected", {}),
        "aggregator_peak_rss_mb": agg.get("peak_rss_mb"),
        "device_peak_rss_mb": solo.get("peak_rss_mb") if solo else None,
        "device_processes": devices,
        "onnx": agg.get("onnx"),
        "deployment": agg.get("deployment"),
        "samples_per_device": sizes,
        # rounds taken part in, updates rejected, samples, bytes sent (launch/report.py)
        "devices": per_device(rounds, agg.get("devices", {}), devices, sizes),
        "marks": marks,
    }


# the closing summary's per-device table stops after this many rows (report.html has them all)
SUMMARY_DEVICES = 25


def print_summary(result: RunResult) -> None:
    m = result.metrics
    kib = 1024
    onnx = m.get("onnx") or {}
    dep = m.get("deployment") or {}
    final = m.get("final_acc")
    lines = [
        "",
        "summary",
        f"  final test accuracy   {final:.4f}" if final is not None else "  final accuracy  -",
        f"  wall time             {m['wall_s']:.1f} s (start-up {m['startup_s'] or 0:.1f} s, "
        f"rounds {m['rounds_wall_s']:.1f} s)",
        f"  per round (median)    {m['round_wall_s_median'] * 1000:.0f} ms, of which slowest "
        f"device training {m['device_compute_s_per_round_median'] * 1000:.0f} ms, coordination "
        f"{m['coordination_s_per_round'] * 1000:.0f} ms",
        f"  uplink / downlink     {m['uplink_bytes_per_device_round'] / kib:.1f} KiB / "
        f"{m['downlink_bytes_per_device_round'] / kib:.1f} KiB per device-round",
    ]
    if m.get("aggregator_peak_rss_mb"):
        dev = m.get("device_peak_rss_mb")
        lines.append(
            f"  peak memory           aggregator {m['aggregator_peak_rss_mb']:.0f} MB, one "
            f"device agent {dev:.0f} MB"
            if dev
            else ""
        )
    if onnx:
        lines.append(
            f"  ONNX                  {onnx['bytes'] / kib:.1f} KiB, parity with PyTorch "
            f"max |diff| {onnx['parity_max_abs']:.2e}"
        )
    if dep and dep.get("promoted"):
        lines.append(
            f"  deployment            v{dep['version']} served by {dep['devices_serving']}/"
            f"{dep['devices_online']} devices {dep['rollout_s']:.2f} s after publishing"
        )
    elif dep:  # refused (failed its parity check) or its canaries were not healthy
        why = dep.get("refused") or (dep.get("canary") or {}).get("reason", "not promoted")
        lines.append(f"  deployment            v{dep['version']} NOT rolled out: {why}")
    if m.get("rejected"):
        lines.append(f"  rejected updates      {m['rejected']}")
    if m.get("devices"):
        lines.append("  per device")
        table = device_table(m["devices"], len(m["rounds"]), limit=SUMMARY_DEVICES)
        lines += [f"    {row}" for row in table]
    lines.append(f"  report                {result.run_dir}/report.html (metrics.json, logs/)")
    print("\n".join(line for line in lines if line))


def run_demo(cfg: RunConfig, run_dir: str | None = None, progress: bool = True) -> RunResult:
    result = run_local(cfg, run_dir, progress=progress)
    if result.metrics.get("rounds"):
        print_summary(result)
    return result
