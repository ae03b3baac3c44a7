"""The reference figures of issue 2, measured on this machine: Flower's deployment runtime on B1.

Issue 2 quotes, for "the best-known general FL framework (Flower), with its gRPC runtime", about
70 ms per round at 1 local epoch, 49 s of start-up for its 21 processes and 460 MB resident per
client process, measured on another host. This script measures the same thing here, with the
same data, partition, model and training loop as ``benchmarks/b1_digits.py``:

- data: digits / 16, stratified 80/20 split, Dirichlet(0.5) over 20 devices, seed 0, at least 10
  samples each: edgefl's own functions (``edgefl.data``), one ``.npz`` per device, as edgefl's demo
  writes them;
- model: MLP 64-128-10 (``edgefl.models``), initial weights seed 0 as edgefl's aggregator;
- training: ``edgefl.training.train_local`` (SGD lr 0.1, batch 32, 1 local epoch, the seed per
  device and round that edgefl's agent uses), ``torch.set_num_threads(1)`` in every client;
- Flower's own FedAvg (``flwr.serverapp.strategy.FedAvg``, weighted by samples), all 20 clients
  every round, no federated evaluation; the global model is evaluated on the test split after
  every round by the ServerApp (``evaluate_fn``).

It runs Flower's deployment runtime, each part in a process of its own, on loopback: one
``flower-superlink``, 20 ``flower-supernode`` processes, and what they start themselves (the
SuperLink a ``flower-superexec`` that runs ``flwr-serverapp``; each SuperNode a
``flower-superexec`` that runs ``flwr-clientapp``). The run is submitted with ``flwr run``, like a
user would. The Flower install used is the one beside the Python running this script, or each
``--flower-venv`` given (several installs alternate run by run, so that drifting machine load hits
all alike).

Flower 1.40 moved the SuperNode-SuperLink link (the Fleet API) from gRPC to HTTP; Flower 1.39 is
the last release whose SuperNodes talk gRPC (grpc-rere). The transport of each install is read
from its version and checked in the SuperLink's log.

Figures (medians over the runs; a 30-round run of 20 clients takes about half an hour on 2 cores,
so ``--short-repeats`` adds shorter runs that count for everything but accuracy):

- start-up: from launching the first process until the ServerApp sends the first round's
  messages (all 20 SuperNodes connected, the run submitted, the ServerApp started);
- round wall time: from the ServerApp sending a round's messages until the new global model is
  aggregated and evaluated on the test split (training included), median over the rounds; the
  first round, in which Flower starts its ClientApp processes, is also shown on its own;
- peak RSS (VmHWM) of every process, sampled from /proc by this script while the run goes on,
  and reported by each ClientApp at the end of its training; one client is its SuperNode, the
  SuperExec that SuperNode starts, and the ClientApp process that trains.

    /tmp/flwr-venv/bin/python benchmarks/reference_flower.py [--repeats 3] [--rounds 30]
        [--short-repeats 2 --short-rounds 6] [--devices 20]
        [--flower-venv /tmp/flwr-venv --flower-venv /tmp/flwr139-venv]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: the repository holds edgefl and benchmarks
    sys.path.insert(0, str(ROOT))

MODEL = "mlp_digits"
APP_PACKAGE = "edgefl_flower_ref"
# quoted in issue 2, measured on another host
ISSUE_2 = {"round_s_1_epoch": 0.070, "startup_s": 49.0, "client_rss_mb": 460.0}


# --------------------------------------------------------------------------------------------
# What runs inside Flower's processes: the ServerApp and the ClientApp. The generated Flower app
# (see _write_app) holds two one-line modules that call these builders.
# --------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB (2**20 bytes): device.telemetry's
    peak_rss_mb, which Flower's processes cannot import (device.telemetry needs msgpack, which
    their venv lacks and which would add to the memory measured)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _emit(path: str, **fields: Any) -> None:
    """One JSON line for the launcher to read."""
    with open(path, "a") as f:
        f.write(json.dumps(fields) + "\n")


_CLIENT_CACHE: dict[str, Any] = {}


def build_client_app() -> Any:
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from edgefl.data import load_npz
    from edgefl.models import build_model
    from edgefl.training import train_local

    torch.set_num_threads(1)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        entered = time.time()
        path = str(context.node_config["data-path"])
        device_id = str(context.node_config["device-id"])
        # a ClientApp process that lives on keeps its data and model
        if path not in _CLIENT_CACHE:
            _CLIENT_CACHE[path] = (load_npz(path, features=64, classes=10), build_model(MODEL))
        data, model = _CLIENT_CACHE[path]
        cfg = msg.content["config"]
        server_round = int(cfg["server-round"])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        # the seed edgefl's agent uses for this device and round
        seed = int.from_bytes(hashlib.sha256(f"{device_id}/{server_round}".encode()).digest()[:4])
        result = train_local(
            model,
            data,
            epochs=int(cfg["epochs"]),
            batch_size=int(cfg["batch-size"]),
            lr=float(cfg["lr"]),
            seed=seed,
        )
        metrics = MetricRecord(
            {
                "num-examples": len(data),
                "train-loss": result.loss,
                "train-s": result.seconds,
                "t-entered": entered,
                "t-done": time.time(),
                "pid": os.getpid(),
                "peak-rss-mb": _peak_rss_mb(),
            }
        )
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


def build_server_app() -> Any:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from edgefl.data import load_npz
    from edgefl.models import build_model
    from edgefl.training import evaluate

    torch.set_num_threads(1)

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg, noting when each round's messages go out and what came back."""

        def __init__(self, events: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.events = events

        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            opened = time.time()
            messages = list(super().configure_train(server_round, arrays, config, grid))
            _emit(
                self.events,
                event="round_start",
                round=server_round,
                t=time.time(),
                opened=opened,
                nodes=len(messages),
            )
            return messages

        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            replies = list(replies)
            clients, errors = [], 0
            for msg in replies:
                if msg.has_error():
                    errors += 1
                else:
                    clients.append(dict(msg.content["metrics"]))
            _emit(
                self.events,
                event="replies",
                round=server_round,
                t=time.time(),
                clients=clients,
                errors=errors,
            )
            return super().aggregate_train(server_round, replies)

    def train_metrics(contents: list[RecordDict], key: str) -> MetricRecord:
        n = [float(c["metrics"][key]) for c in contents]
        loss = [float(c["metrics"]["train-loss"]) for c in contents]
        return MetricRecord(
            {
                key: sum(n),
                "train-loss": sum(a * b for a, b in zip(n, loss, strict=True)) / max(sum(n), 1),
            }
        )

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = context.run_config
        events = str(cfg["events-path"])
        _emit(events, event="serverapp_start", t=time.time(), pid=os.getpid())
        test = load_npz(str(cfg["test-path"]), features=64, classes=10)
        model = build_model(MODEL, seed=int(cfg["model-seed"]))
        devices = int(cfg["devices"])

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(model, test)
            _emit(events, event="evaluated", round=server_round, t=time.time(), acc=acc, loss=loss)
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy = TimedFedAvg(
            events,
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=devices,
            min_available_nodes=devices,
            train_metrics_aggr_fn=train_metrics,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=int(cfg["num-server-rounds"]),
            timeout=float(cfg["round-timeout-s"]),
            train_config=ConfigRecord(
                {
                    "lr": float(cfg["lr"]),
                    "epochs": int(cfg["local-epochs"]),
                    "batch-size": int(cfg["batch-size"]),
                }
            ),
            evaluate_fn=evaluate_fn,
        )
        _emit(events, event="done", t=time.time(), peak_rss_mb=_peak_rss_mb())

    return app


# --------------------------------------------------------------------------------------------
# The launcher: data, the Flower app, the processes, the memory sampler, the figures.
# --------------------------------------------------------------------------------------------


@dataclass
class Install:
    """One Flower install: a venv with flwr, torch, scikit-learn, numpy and psutil."""

    venv: Path
    version: str
    transport: str  # of the Fleet API, SuperNode <-> SuperLink: "gRPC" (grpc-rere) or "HTTP"

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def label(self) -> str:
        return f"Flower {self.version} {self.transport}"

    @property
    def grpc(self) -> bool:
        return self.transport == "gRPC"

    @classmethod
    def of(cls, venv: Path) -> Install:
        venv = venv.resolve() if venv.exists() else venv
        python = venv / "bin" / "python"
        out = subprocess.run(
            [str(python), "-c", "import flwr; print(flwr.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise SystemExit(f"{python}: cannot import flwr: {out.stderr.strip()[-400:]}")
        version = out.stdout.strip()
        major, minor = (int(x) for x in version.split(".")[:2])
        grpc = (major, minor) < (1, 40)  # 1.40 moved the Fleet API to HTTP
        return cls(venv, version, "gRPC" if grpc else "HTTP")


def _wait_port(port: int, deadline: float, proc: subprocess.Popen) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def _prepare_data(data_dir: Path, devices: int) -> dict[str, int]:
    """B1's split, with edgefl's own functions, one .npz per device (as edgefl's demo does)."""
    from edgefl.data import Dataset, dirichlet_partition, load_digits_split, save_npz

    train, test = load_digits_split(0.2, seed=0)
    parts = dirichlet_partition(train.y, devices, alpha=0.5, seed=0, min_samples=10)
    sizes = {}
    for i, idx in enumerate(parts):
        device_id = f"dev-{i:02d}"
        save_npz(data_dir / f"{device_id}.npz", Dataset(train.X[idx], train.y[idx]))
        sizes[device_id] = len(idx)
    save_npz(data_dir / "test.npz", test)
    return sizes


def _write_app(app_dir: Path, config: dict[str, Any]) -> None:
    """A Flower app (pyproject.toml and a package) whose components are built above."""
    pkg = app_dir / APP_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        '"""edgefl B1 on Flower: see benchmarks/reference_flower.py."""\n'
    )
    for kind in ("server", "client"):
        (pkg / f"{kind}_app.py").write_text(
            f"from benchmarks.reference_flower import build_{kind}_app\n\n"
            f"app = build_{kind}_app()\n"
        )

    def toml_value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else repr(v)

    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "edgefl-flower-ref"',
        'version = "1.0.0"',
        'description = "B1 of edgefl on Flower"',
        'license = "Apache-2.0"',
        'dependencies = ["flwr>=1.39", "torch", "numpy"]',
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "edgefl"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{APP_PACKAGE}.server_app:app"',
        f'clientapp = "{APP_PACKAGE}.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {toml_value(v)}" for k, v in config.items()),
        "",
    ]
    (app_dir / "pyproject.toml").write_text("\n".join(lines))


def _status(pid: int) -> tuple[float, float] | None:
    """(VmHWM, VmRSS) of a process in MB, or None once it is gone."""
    hwm = rss = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return hwm, rss


def _role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    for role in (
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-serverapp",
        "flwr-clientapp",
    ):
        if role in text:
            return role
    return os.path.basename(cmdline[0]) if cmdline else "?"


@dataclass
class _Proc:
    pid: int
    owner: str  # "superlink" or a device id: whose tree it is in
    role: str
    peak_mb: float = 0.0
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class TreeSampler:
    """Samples, every ``interval`` s, the memory of every process under each process started.

    VmHWM is a process's own peak since it began, so a sample late in a process's life catches
    its peak whenever that was; a process that ends between two samples is missed here (the
    ClientApp also reports its own peak when its training ends)."""

    roots: dict[int, str]
    interval: float = 0.5
    procs: dict[int, _Proc] = field(default_factory=dict)
    tree_peak_mb: dict[str, float] = field(default_factory=dict)  # summed VmRSS, at one sample
    max_alive: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        import psutil

        children: dict[int, list[int]] = {}
        for p in psutil.process_iter(["ppid"]):
            ppid = p.info.get("ppid")
            if ppid:
                children.setdefault(ppid, []).append(p.pid)
        now = time.time()
        alive = 0
        for root, owner in self.roots.items():
            total = 0.0
            stack = [root]
            while stack:
                pid = stack.pop()
                stack.extend(children.get(pid, []))
                st = _status(pid)
                if st is None:
                    continue
                hwm, rss = st
                alive += 1
                total += rss
                # read every time: a process forked to run another program shows its parent's
                # command line until it execs, and its peak starts afresh there
                try:
                    role = _role(psutil.Process(pid).cmdline())
                except psutil.Error:
                    continue
                proc = self.procs.get(pid)
                if proc is None:
                    proc = self.procs[pid] = _Proc(pid, owner, role, first_seen=now)
                elif proc.role != role:
                    proc.role, proc.peak_mb = role, 0.0
                proc.peak_mb = max(proc.peak_mb, hwm)
                proc.last_seen = now
            self.tree_peak_mb[owner] = max(self.tree_peak_mb.get(owner, 0.0), total)
        self.max_alive = max(self.max_alive, alive)

    def pids(self) -> list[int]:
        return list(self.procs)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop_all(procs: list[subprocess.Popen], extra_pids: list[int]) -> None:
    """SIGTERM each process group started here, then SIGKILL whatever is left, by id."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)
    for pid in extra_pids:  # descendants that left their group, if any
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _median(values: list[float | None]) -> float | None:
    # imported here, not at the top: Flower's app processes import this module too, and their
    # memory is what is measured
    from benchmarks.common import median

    return median(values)


def run_once(
    install: Install, args: argparse.Namespace, rounds: int, label: str, keep: bool
) -> dict[str, Any]:
    """One run of ``rounds`` rounds; returns its figures."""
    from broker.private import free_port

    work = Path(tempfile.mkdtemp(prefix=f"edgefl-flower-{label}-"))
    logs = work / "logs"
    logs.mkdir()
    t_begin = time.time()
    sizes = _prepare_data(work / "data", args.devices)
    events = work / "events.jsonl"
    events.touch()
    _write_app(
        work / "app",
        {
            "num-server-rounds": rounds,
            "local-epochs": args.epochs,
            "lr": 0.1,
            "batch-size": 32,
            "devices": args.devices,
            "model-seed": 0,
            "round-timeout-s": 600.0,
            "events-path": str(events),
            "test-path": str(work / "data" / "test.npz"),
        },
    )
    home = work / "flwr-home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = dict(
        os.environ,
        FLWR_HOME=str(home),
        # no internet here: Flower's telemetry and update check would only time out
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        # as in an activated venv: Flower starts its helpers (flower-superexec ...) by name
        PATH=os.pathsep.join([str(install.bin), os.environ.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(
            [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
        ),
    )
    b = install.bin
    link_cmd = [
        str(b / "flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(link_port),
        "--disable-runtime-dependency-installation",
    ]
    if install.grpc:
        fleet_port = free_port()
        link_cmd += [
            "--fleet-api-type",
            "grpc-rere",
            "--fleet-api-address",
            f"127.0.0.1:{fleet_port}",
        ]
    else:
        fleet_port = link_port  # the Fleet API shares the SuperLink's HTTP port
    procs: list[subprocess.Popen] = []
    roots: dict[int, str] = {}
    marks: dict[str, float] = {}
    error = None
    sampler: TreeSampler | None = None
    done: dict[str, Any] = {}
    try:
        t_launch = time.time()
        marks["data_prep_s"] = t_launch - t_begin
        link = _spawn(link_cmd, env, logs / "superlink.log")
        procs.append(link)
        roots[link.pid] = "superlink"
        for i in range(args.devices):
            device_id = f"dev-{i:02d}"
            data = work / "data" / f"{device_id}.npz"
            node_cmd = [
                str(b / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{fleet_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                f'data-path="{data}" device-id="{device_id}"',
            ]
            if install.grpc:
                node_cmd.insert(2, "--grpc-rere")
            node = _spawn(node_cmd, env, logs / f"supernode-{device_id}.log")
            procs.append(node)
            roots[node.pid] = device_id
        marks["launched_s"] = time.time() - t_launch
        sampler = TreeSampler(roots, interval=args.sample_interval)
        sampler.start()
        deadline = time.monotonic() + args.timeout
        if not _wait_port(link_port, min(deadline, time.monotonic() + 120), link):
            raise RuntimeError(f"the SuperLink did not open port {link_port}; see {logs}")
        marks["superlink_up_s"] = time.time() - t_launch
        for attempt in range(5):
            out = subprocess.run(
                [str(b / "flwr"), "run", str(work / "app"), "local"],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                cwd=work,
            )
            (logs / f"flwr-run-{attempt}.log").write_text(out.stdout + out.stderr)
            if out.returncode == 0:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"flwr run failed: {(out.stdout + out.stderr).strip()[-800:]}")
        marks["submitted_s"] = time.time() - t_launch
        seen = 0
        while time.monotonic() < deadline:
            lines = events.read_text().splitlines()
            for line in lines[seen:]:
                ev = json.loads(line)
                if ev["event"] == "done":
                    done = ev
            seen = len(lines)
            if done:
                break
            if link.poll() is not None:
                raise RuntimeError(f"the SuperLink exited with code {link.returncode}; see {logs}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the run did not finish within {args.timeout:.0f} s; see {logs}")
        marks["done_s"] = time.time() - t_launch
        got = sum(1 for x in events.read_text().splitlines() if '"event": "evaluated"' in x) - 1
        if got != rounds:
            raise RuntimeError(f"{got} of {rounds} rounds evaluated; see {logs}")
    except Exception as e:  # noqa: BLE001 - reported with the run
        error = str(e)
    finally:
        if sampler is not None:
            sampler.stop()
        _stop_all(procs, sampler.pids() if sampler else [])
    marks["total_s"] = time.time() - t_begin
    if error:
        keep = True
    result = _figures(install, events, sampler, marks, t_launch, sizes, args, error)
    result["rounds_planned"] = rounds
    result["superlink_transport_log"] = _transport_line(logs / "superlink.log")
    result["work_dir"] = str(work) if keep else None
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _transport_line(path: Path) -> str | None:
    """The SuperLink's own word on how its Fleet API listens."""
    try:
        for line in path.read_text(errors="replace").splitlines():
            plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if "fleet" in plain.lower() and "start" in plain.lower():
                return plain.split(":", 1)[-1].strip()[-160:]
    except OSError:
        pass
    return None


def _figures(
    install: Install,
    events_path: Path,
    sampler: TreeSampler | None,
    marks: dict[str, float],
    t_launch: float,
    sizes: dict[str, int],
    args: argparse.Namespace,
    error: str | None,
) -> dict[str, Any]:
    events = [json.loads(x) for x in events_path.read_text().splitlines() if x.strip()]
    starts = {e["round"]: e for e in events if e["event"] == "round_start"}
    evals = {e["round"]: e for e in events if e["event"] == "evaluated"}
    replies = {e["round"]: e for e in events if e["event"] == "replies"}
    done = next((e for e in events if e["event"] == "done"), {})
    server_start = next((e for e in events if e["event"] == "serverapp_start"), {})
    rounds = []
    client_pids: dict[str, set[int]] = {}
    reported_peak: dict[int, float] = {}
    for r in sorted(starts):
        if r not in evals:
            break
        t0, t1 = starts[r]["t"], evals[r]["t"]
        clients = replies.get(r, {}).get("clients", [])
        for c in clients:
            pid = int(c["pid"])
            reported_peak[pid] = max(reported_peak.get(pid, 0.0), float(c["peak-rss-mb"]))
            client_pids.setdefault(str(pid), set()).add(r)
        train = [float(c["train-s"]) for c in clients]
        rounds.append(
            {
                "round": r,
                "wall_s": t1 - t0,
                "accuracy": evals[r]["acc"],
                "reported": len(clients),
                "errors": replies.get(r, {}).get("errors"),
                "train_s_max": max(train, default=0.0),
                # from the messages going out to the first and the last ClientApp starting work
                "first_client_start_s": min((c["t-entered"] - t0 for c in clients), default=None),
                "last_client_start_s": max((c["t-entered"] - t0 for c in clients), default=None),
                "last_client_done_s": max((c["t-done"] - t0 for c in clients), default=None),
                "replies_to_evaluated_s": t1 - replies[r]["t"] if r in replies else None,
            }
        )
    walls = [x["wall_s"] for x in rounds]
    out: dict[str, Any] = {
        "flower": install.version,
        "transport": install.transport,
        "error": error,
        "rounds_done": len(rounds),
        "final_acc": rounds[-1]["accuracy"] if rounds else None,
        "acc_by_round": [x["accuracy"] for x in rounds],
        "startup_s": starts[1]["t"] - t_launch if 1 in starts else None,
        "startup_incl_data_prep_s": (
            starts[1]["t"] - t_launch + marks["data_prep_s"] if 1 in starts else None
        ),
        "serverapp_started_s": server_start["t"] - t_launch if server_start else None,
        "first_round_wall_s": walls[0] if walls else None,
        "round_wall_s_median": _median(walls),
        "round_wall_s_median_after_first": _median(walls[1:]),
        "round_wall_s_min": min(walls) if walls else None,
        "round_wall_s_max": max(walls) if walls else None,
        "slowest_training_s_median": _median([x["train_s_max"] for x in rounds]),
        "coordination_s_median": _median([x["wall_s"] - x["train_s_max"] for x in rounds]),
        "first_client_start_s_median": _median([x["first_client_start_s"] for x in rounds]),
        "last_client_start_s_median": _median([x["last_client_start_s"] for x in rounds]),
        "last_client_done_s_median": _median([x["last_client_done_s"] for x in rounds]),
        "replies_to_evaluated_s_median": _median([x["replies_to_evaluated_s"] for x in rounds]),
        "wall_s": marks.get("done_s"),
        "marks": marks,
        "samples": sum(sizes.values()),
        "rounds": rounds,
        "serverapp_peak_rss_mb_reported": done.get("peak_rss_mb"),
    }
    # ClientApp processes: one per message, or kept across rounds?
    out["clientapp_processes"] = len(client_pids)
    out["clientapp_processes_per_device_round"] = len(client_pids) / max(
        sum(x["reported"] for x in rounds), 1
    )
    if sampler is not None:
        out.update(_memory(sampler, reported_peak, args.devices))
    return out


def _memory(sampler: TreeSampler, reported: dict[int, float], devices: int) -> dict[str, Any]:
    """Peak RSS per process role, and what one client (SuperNode + SuperExec + ClientApp) holds."""
    by_role: dict[str, list[float]] = {}
    per_device: dict[str, dict[str, float]] = {}
    for p in sampler.procs.values():
        peak = max(p.peak_mb, reported.get(p.pid, 0.0))
        side = "server" if p.owner == "superlink" else "client"
        role = f"{side}:{p.role}"
        by_role.setdefault(role, []).append(peak)
        if side == "client":
            d = per_device.setdefault(p.owner, {})
            d[p.role] = max(d.get(p.role, 0.0), peak)
    # ClientApp processes that ended between two samples are known from their own report only
    sampled = {p.pid for p in sampler.procs.values()}
    missed = [v for pid, v in reported.items() if pid not in sampled]
    if missed:
        by_role.setdefault("client:flwr-clientapp", []).extend(missed)
    client_roles = ("flower-supernode", "flower-superexec", "flwr-clientapp")
    # short helpers Flower runs now and then (uname, file ...) are not counted
    one_client = [sum(d.get(r, 0.0) for r in client_roles) for d in per_device.values()]
    roles = {
        role: {"processes": len(v), "peak_mb_median": _median(v), "peak_mb_max": max(v)}
        for role, v in sorted(by_role.items())
    }
    known = {"flower-superlink", "flwr-serverapp", *client_roles}
    return {
        "rss_by_role": roles,
        "processes_seen": len(sampler.procs) + len(missed),
        # those that live through the run (all but the ClientApps and short helpers)
        "processes_long_lived": sum(
            p.role in known and p.role != "flwr-clientapp" for p in sampler.procs.values()
        ),
        "processes_alive_max": sampler.max_alive,
        "clientapp_missed_by_sampler": len(missed),
        "client_supernode_peak_rss_mb": roles.get("client:flower-supernode", {}).get(
            "peak_mb_median"
        ),
        "client_superexec_peak_rss_mb": roles.get("client:flower-superexec", {}).get(
            "peak_mb_median"
        ),
        "clientapp_peak_rss_mb": roles.get("client:flwr-clientapp", {}).get("peak_mb_median"),
        "clientapp_peak_rss_mb_max": roles.get("client:flwr-clientapp", {}).get("peak_mb_max"),
        # the three processes of one client, each at its own peak, added (median over devices)
        "one_client_peak_rss_mb": _median(one_client),
        "one_client_complete_devices": sum(
            all(r in d for r in client_roles) for d in per_device.values()
        ),
        # the most the three held at one sampling instant (median over devices)
        "one_client_concurrent_rss_mb": _median(
            [v for k, v in sampler.tree_peak_mb.items() if k != "superlink"]
        ),
        "server_side_concurrent_rss_mb": sampler.tree_peak_mb.get("superlink"),
        "devices": devices,
    }


def summarise(runs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Medians over the runs that worked; accuracy and run wall time over full-length runs only."""
    ok = [r for r in runs if not r["error"]]
    full = [r for r in ok if r["rounds_planned"] == rounds]

    def med(key: str) -> float | None:
        return _median([r.get(key) for r in ok])

    keys = [
        "startup_s",
        "serverapp_started_s",
        "first_round_wall_s",
        "round_wall_s_median",
        "round_wall_s_median_after_first",
        "slowest_training_s_median",
        "coordination_s_median",
        "first_client_start_s_median",
        "last_client_start_s_median",
        "last_client_done_s_median",
        "replies_to_evaluated_s_median",
        "client_supernode_peak_rss_mb",
        "client_superexec_peak_rss_mb",
        "clientapp_peak_rss_mb",
        "clientapp_peak_rss_mb_max",
        "one_client_peak_rss_mb",
        "one_client_concurrent_rss_mb",
        "server_side_concurrent_rss_mb",
        "processes_seen",
        "processes_long_lived",
        "processes_alive_max",
        "clientapp_processes_per_device_round",
    ]
    s: dict[str, Any] = {k: med(k) for k in keys}
    for role in ("server:flower-superlink", "server:flower-superexec", "server:flwr-serverapp"):
        s[role.split(":")[1].replace("-", "_") + "_peak_rss_mb"] = _median(
            [r.get("rss_by_role", {}).get(role, {}).get("peak_mb_max") for r in ok]
        )
    s["final_acc"] = _median([r["final_acc"] for r in full])
    s["wall_s"] = _median([r["wall_s"] for r in full])
    s["acc_by_round"] = [_median([r["acc_by_round"][i] for r in full]) for i in range(rounds)]
    s["rounds_wall_s"] = [_median([r["rounds"][i]["wall_s"] for r in full]) for i in range(rounds)]
    s["runs_ok"] = len(ok)
    s["runs_full_length"] = len(full)
    s["runs"] = len(runs)
    return s


def _edgefl_b1() -> dict[str, Any] | None:
    """edgefl's own 1-epoch figures from benchmarks/results/b1_digits.json, if there."""
    path = ROOT / "benchmarks" / "results" / "b1_digits.json"
    try:
        b1 = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    one = b1.get("one_epoch", {})
    return {
        "measured": b1.get("machine", {}).get("date"),
        "final_acc": one.get("final_acc"),
        "startup_s": one.get("startup_s"),
        "round_wall_s": one.get("round_wall_s"),
        "device_peak_rss_mb": one.get("device_peak_rss_mb"),
        "aggregator_peak_rss_mb": one.get("aggregator_peak_rss_mb"),
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import cpu_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="full-length runs per install")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument(
        "--short-repeats",
        type=int,
        default=0,
        help="more runs per install of --short-rounds rounds, for start-up, round time and\n"
        "memory only (a full run takes about half an hour on 2 cores)",
    )
    p.add_argument("--short-rounds", type=int, default=6)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--flower-venv",
        type=Path,
        action="append",
        help="a venv holding flwr (repeat to compare installs); default: this Python's own",
    )
    p.add_argument("--timeout", type=float, default=2700.0, help="seconds, per run")
    p.add_argument("--sample-interval", type=float, default=0.5, help="memory sampling, s")
    p.add_argument("--keep", action="store_true", help="keep each run's folder and logs")
    p.add_argument("--no-write", action="store_true", help="print only; leave results/ alone")
    args = p.parse_args(argv)

    venvs = args.flower_venv or [Path(sys.prefix)]
    installs = [Install.of(v) for v in venvs]
    runs: dict[str, list[dict[str, Any]]] = {i.label: [] for i in installs}
    plan = [args.rounds] * args.repeats + [args.short_rounds] * args.short_repeats
    for n, rounds in enumerate(plan):
        for inst in installs:  # alternate installs so drifting load hits all alike
            print(f"{inst.label}: run {n + 1}/{len(plan)} ({rounds} rounds) ...", flush=True)
            t = time.monotonic()
            r = run_once(inst, args, rounds, f"{inst.version}-{n}", args.keep)
            runs[inst.label].append(r)
            state = f"failed: {r['error']}" if r["error"] else "ok"
            print(
                f"  {state}; {r['rounds_done']} rounds, start-up {_s(r['startup_s'])} s, "
                f"round median {_ms(r['round_wall_s_median'])} ms, final acc "
                f"{r['final_acc']}, one client {_s(r.get('one_client_peak_rss_mb'))} MB "
                f"({time.monotonic() - t:.0f} s)",
                flush=True,
            )
    summaries = {label: summarise(rs, args.rounds) for label, rs in runs.items()}
    edgefl = _edgefl_b1()
    text = _report(installs, summaries, runs, edgefl, args)
    print(text)
    figures = {
        "cpu_model": cpu_model(),
        "protocol": {
            "devices": args.devices,
            "rounds": args.rounds,
            "full_runs": args.repeats,
            "short_runs": args.short_repeats,
            "short_rounds": args.short_rounds,
            "local_epochs": args.epochs,
            "lr": 0.1,
            "batch_size": 32,
            "partition": "dirichlet alpha 0.5 seed 0 min 10 (edgefl.data)",
            "runtime": "Flower deployment runtime: flower-superlink + flower-supernode "
            "processes on loopback, isolation=subprocess, run submitted with flwr run",
        },
        "installs": {
            i.label: {"flwr": i.version, "transport": i.transport, "venv": str(i.venv)}
            for i in installs
        },
        "summary": summaries,
        "runs": runs,
        "edgefl_b1_one_epoch": edgefl,
        "issue_2_quoted": ISSUE_2,
    }
    if not args.no_write:
        from benchmarks.common import write_results

        write_results("reference_flower", figures, text)
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}))
    return 0 if all(s["runs_ok"] == s["runs"] for s in summaries.values()) else 1


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _report(
    installs: list[Install],
    summaries: dict[str, dict[str, Any]],
    runs: dict[str, list[dict[str, Any]]],
    edgefl: dict[str, Any] | None,
    args: argparse.Namespace,
) -> str:
    from benchmarks.common import cpu_model, table

    labels = [i.label for i in installs]
    ms = 1000.0

    def row(name: str, key: str, scale: float = 1.0, edge: Any = None, quoted: Any = None) -> list:
        vals = [summaries[lb].get(key) for lb in labels]
        return [name, *[None if v is None else v * scale for v in vals], edge, quoted]

    e = edgefl or {}
    summary = table(
        ["figure (median of runs)", *labels, "edgefl (b1_digits.json)", "issue 2, other host"],
        [
            row("final test accuracy", "final_acc", edge=e.get("final_acc")),
            row(
                "start-up to first round, s",
                "startup_s",
                edge=e.get("startup_s"),
                quoted=ISSUE_2["startup_s"],
            ),
            row("  ServerApp started, s", "serverapp_started_s"),
            row(
                "round wall time, ms",
                "round_wall_s_median",
                ms,
                edge=None if e.get("round_wall_s") is None else e["round_wall_s"] * ms,
                quoted=ISSUE_2["round_s_1_epoch"] * ms,
            ),
            row("  rounds 2.., ms", "round_wall_s_median_after_first", ms),
            row("  first round, ms", "first_round_wall_s", ms),
            row("  slowest client training, ms", "slowest_training_s_median", ms),
            row("  coordination (wall - slowest), ms", "coordination_s_median", ms),
            row("  first ClientApp starts work, ms", "first_client_start_s_median", ms),
            row("  last ClientApp starts work, ms", "last_client_start_s_median", ms),
            row("  last ClientApp done, ms", "last_client_done_s_median", ms),
            row("  all replies in to evaluated, ms", "replies_to_evaluated_s_median", ms),
            row("run wall time, s", "wall_s"),
            row("SuperNode peak RSS, MB", "client_supernode_peak_rss_mb"),
            row("client SuperExec peak RSS, MB", "client_superexec_peak_rss_mb"),
            row("ClientApp peak RSS, MB", "clientapp_peak_rss_mb"),
            row(
                "one client (the three added), MB",
                "one_client_peak_rss_mb",
                edge=e.get("device_peak_rss_mb"),
                quoted=ISSUE_2["client_rss_mb"],
            ),
            row("  at one instant, sampled, MB", "one_client_concurrent_rss_mb"),
            row("SuperLink peak RSS, MB", "flower_superlink_peak_rss_mb"),
            row(
                "ServerApp peak RSS, MB",
                "flwr_serverapp_peak_rss_mb",
                edge=e.get("aggregator_peak_rss_mb"),
            ),
            row("server side at one instant, MB", "server_side_concurrent_rss_mb"),
            row("processes living through the run", "processes_long_lived"),
            row("processes started, all told", "processes_seen"),
            row("  alive at once, at most", "processes_alive_max"),
            row("ClientApp processes / device-round", "clientapp_processes_per_device_round"),
        ],
    )
    per_run = table(
        [
            "install",
            "run",
            "rounds",
            "ok",
            "start-up s",
            "round ms",
            "first round ms",
            "final acc",
            "one client MB",
            "ClientApp MB",
            "SuperNode MB",
        ],
        [
            [
                lb,
                i + 1,
                r["rounds_planned"],
                "yes" if not r["error"] else "no",
                r.get("startup_s"),
                None if r.get("round_wall_s_median") is None else r["round_wall_s_median"] * ms,
                None if r.get("first_round_wall_s") is None else r["first_round_wall_s"] * ms,
                r.get("final_acc"),
                r.get("one_client_peak_rss_mb"),
                r.get("clientapp_peak_rss_mb"),
                r.get("client_supernode_peak_rss_mb"),
            ]
            for lb in labels
            for i, r in enumerate(runs[lb])
        ],
    )
    errors = [
        f"  {lb} run {i + 1}: {r['error']}"
        for lb in labels
        for i, r in enumerate(runs[lb])
        if r["error"]
    ]
    runs_text = f"{args.repeats} full-length runs"
    if args.short_repeats:
        runs_text += (
            f" and {args.short_repeats} of {args.short_rounds} rounds per install (accuracy and "
            "run wall time: full-length runs only)"
        )
    head = (
        f"B1 on Flower's deployment runtime (SuperLink + {args.devices} SuperNodes, each its own "
        f"process, loopback), {args.rounds} rounds, {args.epochs} local epoch(s); medians of "
        f"{runs_text}. CPU: {cpu_model()}, {os.cpu_count()} cores"
    )
    notes = (
        "One client = its SuperNode, the SuperExec it starts and the ClientApp process that\n"
        "trains, each at its own peak (VmHWM), added. Start-up: first process launched until the\n"
        "ServerApp sends round 1. Round: messages sent until the new model is evaluated.\n"
        "edgefl's column is read from results/b1_digits.json (1 local epoch, measured "
        f"{e.get('measured', '-')}); issue 2's figures were measured on another host."
    )
    parts = [head, summary, "Per run:\n" + per_run, notes]
    if errors:
        parts.append("Failed runs:\n" + "\n".join(errors))
    return "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
