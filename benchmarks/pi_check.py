"""`make pi-check`: device/install.sh and the device agent on an emulated Raspberry Pi.

A release check, not a test (it takes minutes), run as root on an x86_64 Debian machine:

1. An arm64 Debian bookworm root file system from debootstrap (Raspberry Pi OS 64-bit is
   bookworm on arm64), run through qemu-user registered with binfmt_misc.
2. A wheelhouse of aarch64 wheels, one pinned version per package (pip download --no-deps:
   pip evaluates dependency markers for the machine it runs on, not for --platform, so letting
   it resolve would fetch x86_64's CUDA packages).
3. A copy of the root file system gets `device/install.sh` from this checkout, offline from the
   wheelhouse: once as a training device, once with --serve-only below a prefix.
4. `edgefl broker` and `edgefl aggregator` run on this machine; the emulated agents (as the user
   edgefl) join over MQTT. The training agent must complete rounds and serve the deployed ONNX
   model, and come back after SIGKILL serving it and training again; the serve-only agent must
   serve it too, be left out of rounds, and decline a task sent to it.

Under qemu-user, ONNX Runtime fails on import when it reads the host's x86 /proc/cpuinfo, so
every emulated process sees a Raspberry Pi 4's instead, bind-mounted in a private mount
namespace (unshare -m). The root file system and the wheelhouse are cached in
/var/cache/edgefl-pi-check (EDGEFL_PI_CACHE), so a second run starts at step 3.

It prints its figures and ends with one JSON line; benchmarks/results/pi_check.{md,json} keep
them. `--reuse-install` keeps the last run's installs and their figures (for work on step 4).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import table, write_results
from broker.private import free_port
from edgefl.config import AggregatorConfig, BrokerConfig, to_dict, to_toml
from edgefl.data import Dataset, dirichlet_partition, load_digits_split, save_npz
from edgefl.messages import Reply, Status, Task
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEFL_PI_CACHE", "/var/cache/edgefl-pi-check"))
ROOTFS = CACHE / "bookworm-arm64"  # built once, never changed
WORK = CACHE / "run"  # this run's copy, where the installs go
WHEELS = CACHE / "wheels-aarch64"
LOCK = Path("/tmp/edgefl-bench.lock")  # one heavy job at a time on a shared machine
MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
FLEET = "pi"
ROUNDS = 3  # before the agent is killed; one more after it restarts
SERVE_ONLY_PREFIX = "/srv/serve-only"

# Every package the two installs need, besides torch, which comes from install.sh's aarch64
# range. Versions are this machine's (the ones the test suite passes with), so the check
# installs what was tested; setuptools is pyproject.toml's build backend.
PACKAGES = [
    # serving: pyproject.toml's dependencies, and ONNX Runtime's
    "numpy",
    "paho-mqtt",
    "msgpack",
    "zstandard",
    "psutil",
    "onnxruntime",
    "flatbuffers",
    "packaging",
    "protobuf",
    "sympy",
    "mpmath",
    # torch's
    "filelock",
    "typing-extensions",
    "networkx",
    "jinja2",
    "markupsafe",
    "fsspec",
    "setuptools",
]
# pip takes the glibc versions a wheel may need one by one; bookworm has 2.36
PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)]
CUDA = re.compile(r"^(nvidia[-_]|triton|cuda[-_])", re.I)

# what a Raspberry Pi 4 (Cortex-A72) shows in /proc/cpuinfo, one block per core
CPUINFO = (
    "".join(
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
        "CPU revision\t: 3\n\n"
        for i in range(4)
    )
    + "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
)


def say(text: str) -> None:
    print(f"pi-check: {text}", flush=True)


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kw)


# -- the emulated machine -----------------------------------------------------------------------


def host_tools() -> None:
    if shutil.which("debootstrap") and Path("/usr/bin/qemu-aarch64-static").exists():
        return
    say("installing debootstrap, qemu-user-static and binfmt-support with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(
        ["apt-get", "install", "-y", "-qq", "debootstrap", "qemu-user-static", "binfmt-support"],
        env=env,
    )


def register_qemu() -> None:
    """Let the kernel run aarch64 binaries through qemu-user (binfmt_misc)."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)])
    entry = misc / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    if "enabled" not in entry.read_text():
        sys.exit("pi-check: cannot register qemu-aarch64 with binfmt_misc on this machine")


def build_rootfs() -> float | None:
    """Build the root file system unless it is cached; returns the seconds it took, if built."""
    if ROOTFS.exists():
        say(f"root file system: {ROOTFS} (cached)")
        return None
    partial = ROOTFS.with_name(ROOTFS.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    say(f"building an arm64 bookworm root file system in {ROOTFS} (a few minutes, once)")
    started = time.perf_counter()
    run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            f"--include={DEBIAN_PACKAGES}",
            "bookworm",
            str(partial),
            MIRROR,
        ]
    )
    partial.rename(ROOTFS)
    took = time.perf_counter() - started
    say(f"root file system built in {took:.0f} s")
    return took


def torch_range() -> str:
    text = (ROOT / "device" / "install.sh").read_text()
    return re.search(r"^TORCH_RANGE_AARCH64='([^']*)'$", text, re.M)[1]


def fill_wheelhouse() -> list[str]:
    """The aarch64 wheels of every package, pinned; returns the pins."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in PACKAGES] + [torch_range()]
    WHEELS.mkdir(parents=True, exist_ok=True)
    say(f"wheelhouse {WHEELS}: {' '.join(pins)}")
    aarch64 = [arg for p in PLATFORMS for arg in ("--platform", p)]
    aarch64 += ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    aarch64 += ["--abi", "cp311"]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    run([*pip, *aarch64, "-d", str(WHEELS), *pins])
    return pins


class Emulated:
    """Commands inside the copy of the root file system, under qemu-user.

    Each runs in a private mount namespace holding /proc (with the ARM cpuinfo over it), /dev,
    the checkout (read-only) at /mnt/edgefl and the wheelhouse at /mnt/wheels; all of it goes
    away with the process. unshare, chroot and setpriv each exec the next, so a command's pid
    is the emulated program's own, and a signal to it reaches the program.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cpuinfo = CACHE / "cpuinfo-rpi4"
        self.cpuinfo.write_text(CPUINFO)
        for mount_point in ("mnt/edgefl", "mnt/wheels"):
            (root / mount_point).mkdir(parents=True, exist_ok=True)

    def argv(self, command: str, user: str | None = None) -> list[str]:
        r = self.root
        enter = f"""set -e
mount -t proc proc {r}/proc
mount --bind {self.cpuinfo} {r}/proc/cpuinfo
mount --rbind /dev {r}/dev
mount --bind -o ro {ROOT} {r}/mnt/edgefl
mount --bind -o ro {WHEELS} {r}/mnt/wheels
exec chroot {r} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \\
    PYTHONUNBUFFERED=1 "$@"
"""
        inner = ["/bin/sh", "-c", command]
        if user:  # as the unit runs it: that user, in /var/lib/edgefl
            become = f"--reuid={user} --regid={user} --init-groups"
            as_user = f'cd /var/lib/edgefl && exec setpriv {become} /bin/sh -c "$0"'
            inner = ["/bin/sh", "-c", as_user, command]
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            enter,
            "enter",
            *inner,
        ]

    def run(self, command: str, user: str | None = None, log: Path | None = None) -> str:
        out = subprocess.run(
            self.argv(command, user), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        if log is not None:
            log.write_text(out.stdout)
        if out.returncode != 0:
            print(out.stdout[-4000:])
            raise RuntimeError(f"in the emulated machine: {command!r} exited {out.returncode}")
        return out.stdout


class EmulatedAgent:
    """`edgefl device` on the emulated machine, as the unit runs it (user edgefl). It runs in a
    process group of its own, so that killing it reaches the agent through the shells."""

    def __init__(self, emu: Emulated, venv: str, config: str, log: Path) -> None:
        self.argv = emu.argv(f"{venv}/bin/edgefl device --config {config}", user="edgefl")
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; returns when (time.perf_counter())."""
        with self.log.open("ab") as f:
            self.proc = subprocess.Popen(
                self.argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        return time.perf_counter()

    def kill(self) -> None:
        """As a power cut would: no goodbye, so its Last Will says offline."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


def wheel_key(name_version: str) -> str:
    """ "MarkupSafe-3.0.4" and "markupsafe-3.0.4-cp311-....whl" alike: "markupsafe-3.0.4"."""
    name, version = name_version.split("-")[:2]
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


def venv_facts(venv: Path) -> dict[str, Any]:
    site = next(venv.glob("lib/python3*/site-packages"))
    dists = sorted(p.name.removesuffix(".dist-info") for p in site.glob("*.dist-info"))
    size = run(["du", "-sm", str(venv)], stdout=subprocess.PIPE).stdout.split()[0]
    torch = [d.split("-", 1)[1] for d in dists if d.startswith("torch-")]
    # what the install downloaded: the wheels of the packages it installed from the wheelhouse
    wheels = {wheel_key(w.name): w.stat().st_size for w in WHEELS.glob("*.whl")}
    fetched = sum(wheels.get(wheel_key(d), 0) for d in dists)
    return {
        "venv_mb": int(size),
        "download_mb": round(fetched / 1e6),
        "torch": torch[0] if torch else None,
        "cuda_packages": [d for d in dists if CUDA.match(d)],
        "packages": len(dists),
    }


def install(emu: Emulated, log_dir: Path) -> dict[str, Any]:
    pip = "PIP_EXTRA='--no-index --find-links /mnt/wheels --no-cache-dir'"
    figures: dict[str, Any] = {}
    for kind, command, venv in [
        ("train", f"{pip} sh /mnt/edgefl/device/install.sh", "opt/edgefl/venv"),
        (
            "serve_only",
            f"{pip} EDGEFL_PREFIX={SERVE_ONLY_PREFIX} sh /mnt/edgefl/device/install.sh "
            "--serve-only",
            f"{SERVE_ONLY_PREFIX.lstrip('/')}/opt/edgefl/venv",
        ),
    ]:
        say(f"install ({kind}): {command}")
        started = time.perf_counter()
        out = emu.run(command, log=log_dir / f"install-{kind}.log")
        took = time.perf_counter() - started
        for line in out.splitlines():
            if "will install" in line or "serve-only:" in line:
                say(f"  {line}")
        facts = venv_facts(emu.root / venv)
        figures[kind] = {"install_s": round(took, 1), **facts}
        say(
            f"  {kind}: {took:.0f} s, venv {facts['venv_mb']} MB, torch {facts['torch']}, "
            f"CUDA packages: {facts['cuda_packages'] or 'none'}"
        )
    return figures


# -- the fleet: broker and aggregator here, agents emulated ----------------------------------------


class Watch:
    """The monitor account's view of the devices' retained status and of their replies."""

    def __init__(self, broker: BrokerConfig) -> None:
        self.topics = Topics(FLEET)
        self.status: dict[str, Status] = {}
        self.received: dict[str, float] = {}  # when each device's status came (perf_counter)
        self.link = MqttLink("pi-check-monitor", broker, clean_start=True)
        self.link.subscribe(self.topics.all_devices("status"), self._on_status)

    def _on_status(self, topic: str, payload: bytes) -> None:
        if payload:  # an empty retained message clears the topic
            device_id = topic.split("/")[-2]
            self.status[device_id] = Status.from_payload(payload)
            self.received[device_id] = time.perf_counter()

    def wait(self, device_id: str, check, timeout: float, what: str) -> float:
        """Wait until the device's status passes ``check``; returns when that status came
        (time.perf_counter())."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            s = self.status.get(device_id)
            if s is not None and check(s):
                return self.received[device_id]
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {device_id}: {what}")


def device_data(emu: Emulated, work: Path) -> Path:
    """Two devices' share of the digits, and the held-out split for the aggregator."""
    train, test = load_digits_split()
    parts = dirichlet_partition(train.y, 8, 0.5, seed=0, min_samples=10)
    for i, where in enumerate(["var/lib/edgefl", f"{SERVE_ONLY_PREFIX[1:]}/var/lib/edgefl"]):
        save_npz(emu.root / where / "data.npz", Dataset(train.X[parts[i]], train.y[parts[i]]))
    save_npz(work / "eval.npz", test)
    return work / "eval.npz"


def device_config(enrolled: Path, device_id: str, prefix: str = "") -> str:
    """The config `edgefl enroll` wrote, with the paths of an install below ``prefix``."""
    text = (enrolled / f"{device_id}.toml").read_text()
    text = re.sub(r"^telemetry_interval_s = .*$", "telemetry_interval_s = 2.0", text, flags=re.M)
    return text.replace('"/var/lib/edgefl', f'"{prefix}/var/lib/edgefl')


def aggregator_config(work: Path, broker_dir: Path, port: int, eval_data: Path) -> Path:
    cfg = AggregatorConfig(
        fleet=FLEET,
        broker=BrokerConfig(
            host="127.0.0.1",
            port=port,
            username="aggregator",
            password=(broker_dir / "aggregator.secret").read_text().strip(),
        ),
        enrolled_devices=str(broker_dir / "enrolled-devices.txt"),
        eval_data=str(eval_data),
        state_dir=str(work / "aggregator"),
    )
    cfg.rounds.rounds = ROUNDS
    cfg.rounds.min_devices = 2  # the serve-only device counts as online, and is left out
    cfg.rounds.wait_for_devices_s = 600.0
    cfg.rounds.deadline_s = 300.0  # emulated training is slow, the first round slowest
    cfg.deploy.rollout_timeout_s = 300.0
    path = work / "aggregator.toml"
    path.write_text(to_toml(to_dict(cfg)))
    return path


def edgefl(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch", *args]


def check_fleet(emu: Emulated, work: Path) -> dict[str, Any]:
    broker_dir, enrolled = work / "broker", work / "enrolled"
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    agents: list[EmulatedAgent] = []
    watch: Watch | None = None
    try:
        broker = subprocess.Popen(
            edgefl(
                "broker",
                "--dir",
                str(broker_dir),
                "--fleet",
                FLEET,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
            ),
            stdout=(work / "broker.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append(broker)
        for _ in range(100):
            if (broker_dir / "monitor.secret").exists() and (broker_dir / "mosquitto.pid").exists():
                break
            time.sleep(0.1)
        run(
            edgefl(
                "enroll",
                "pi-0",
                "pi-serve",
                "--dir",
                str(broker_dir),
                "--fleet",
                FLEET,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--out",
                str(enrolled),
            ),
            stdout=subprocess.DEVNULL,
        )
        eval_data = device_data(emu, work)
        (emu.root / "etc/edgefl/device.toml").write_text(device_config(enrolled, "pi-0"))
        (emu.root / SERVE_ONLY_PREFIX[1:] / "etc/edgefl/device.toml").write_text(
            device_config(enrolled, "pi-serve", SERVE_ONLY_PREFIX)
        )
        configs = f"/etc/edgefl/device.toml {SERVE_ONLY_PREFIX}/etc/edgefl/device.toml"
        emu.run(
            f"chown -R edgefl:edgefl /var/lib/edgefl {SERVE_ONLY_PREFIX}/var/lib/edgefl && "
            f"chown root:edgefl {configs} && chmod 0640 {configs}"
        )
        monitor = BrokerConfig(
            host="127.0.0.1",
            port=port,
            username="monitor",
            password=(broker_dir / "monitor.secret").read_text().strip(),
        )
        watch = Watch(monitor)
        watch.link.start()

        agent = EmulatedAgent(
            emu, "/opt/edgefl/venv", "/etc/edgefl/device.toml", work / "agent.log"
        )
        serve = EmulatedAgent(
            emu,
            f"{SERVE_ONLY_PREFIX}/opt/edgefl/venv",
            f"{SERVE_ONLY_PREFIX}/etc/edgefl/device.toml",
            work / "serve-only.log",
        )
        agents += [agent, serve]
        online = lambda s: s.state == "online"  # noqa: E731
        say("starting the emulated agents (training, serve-only)")
        start_s = -agent.start()
        serve_start_s = -serve.start()
        start_s += watch.wait("pi-0", online, 300, "online")
        say(f"training agent online {start_s:.1f} s after it was started")
        serve_start_s += watch.wait("pi-serve", online, 300, "online")
        trains = watch.status["pi-serve"].capabilities.get("trains")
        say(f"serve-only agent online after {serve_start_s:.1f} s; its birth says trains={trains}")

        config = aggregator_config(work, broker_dir, port, eval_data)
        say(f"aggregator: {ROUNDS} rounds, then export and roll out the ONNX model")
        run(
            edgefl(
                "--log-file", str(work / "aggregator.log"), "aggregator", "--config", str(config)
            ),
            stdout=subprocess.DEVNULL,
        )
        summary = json.loads((work / "aggregator" / "summary.json").read_text())
        rounds = summary["rounds"]
        deployed = summary.get("deployment") or {}
        version = summary["onnx"]["version"]
        serving = lambda s: s.state == "online" and s.serving == version  # noqa: E731
        watch.wait("pi-0", serving, 120, f"serving model v{version}")
        watch.wait("pi-serve", serving, 120, f"serving model v{version}")
        predict = "/opt/edgefl/venv/bin/edgefl predict /var/lib/edgefl/data.npz --json"
        out = emu.run(predict, user="edgefl").splitlines()
        served = json.loads(next(line for line in out if line.startswith("{")))
        accuracy = next(line for line in out if "accuracy" in line)
        say(
            f"model v{version} rolled out to {deployed.get('devices_serving')} of "
            f"{deployed.get('devices_online')} devices; `edgefl predict` on the Pi: {accuracy}"
        )

        # a task sent to the serve-only device all the same
        aggregator = dataclasses.replace(
            monitor,
            username="aggregator",
            password=(broker_dir / "aggregator.secret").read_text().strip(),
        )
        sender = MqttLink("pi-check-sender", aggregator, clean_start=True)
        replies: list[Reply] = []
        sender.subscribe(
            watch.topics.reply("pi-serve"),
            lambda _t, p: replies.append(Reply.from_payload(p, topic_device_id="pi-serve")),
        )
        with sender:
            task = Task(99, version, 1, 32, 0.1, {"name": "dense_fp32"}, time.time() + 120)
            sender.publish(watch.topics.task("pi-serve"), task.to_payload(), qos=1)
            deadline = time.monotonic() + 120
            while not replies and time.monotonic() < deadline:
                time.sleep(0.2)
        declined = replies[0].reason if replies and replies[0].kind == "declined" else None
        say(f"serve-only device, given a task: {declined or 'no decline'}")

        say("killing the training agent (SIGKILL), then starting it again")
        agent.kill()
        watch.wait("pi-0", lambda s: s.state == "offline", 60, "offline (its Last Will)")
        restart_s = -agent.start()
        restart_s += watch.wait("pi-0", serving, 300, f"online again, serving v{version}")
        say(f"restarted agent online and serving v{version} after {restart_s:.1f} s")
        run(
            edgefl(
                "--log-file",
                str(work / "aggregator.log"),
                "aggregator",
                "--config",
                str(config),
                "--rounds",
                str(ROUNDS + 1),
                "--no-export",
            ),
            stdout=subprocess.DEVNULL,
        )
        after = json.loads((work / "aggregator" / "summary.json").read_text())["rounds"]
        # by number: a resumed aggregator may list the rounds before its restart too
        rounds = list({r["round"]: r for r in rounds + after}.values())
    finally:
        if watch is not None:
            watch.link.stop()
        for a in agents:
            a.stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()

    completed = [r for r in rounds if r["reported"] >= 1 and r["applied"]]
    return {
        "agent_start_s": round(start_s, 1),
        "agent_restart_s": round(restart_s, 1),
        "serve_only_start_s": round(serve_start_s, 1),
        "rounds_completed": len(completed),
        "rounds_after_restart": len([r for r in completed if r["round"] > ROUNDS]),
        "round_s": [round(r["wall_s"], 1) for r in rounds],
        "train_s": [round(r["train_s_max"], 2) for r in rounds],
        "left_out": rounds[0].get("left_out", {}),
        "model_version": version,
        "devices_serving": deployed.get("devices_serving"),
        "serving": served["version"] == version and watch.status["pi-serve"].serving == version,
        "predict_on_device": accuracy,
        "serve_only_trains": trains,
        "serve_only_declined": declined,
    }


# -- the whole check ---------------------------------------------------------------------------


def take_lock() -> None:
    while LOCK.exists():
        say(f"waiting for {LOCK} ({LOCK.read_text().strip()}) to go")
        time.sleep(15)
    LOCK.write_text("issue-11 pi-check\n")


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("pi-check: run as root (debootstrap, chroot, mount)")
    take_lock()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    try:
        host_tools()
        register_qemu()
        rootfs_s = build_rootfs()
        pins = fill_wheelhouse()
        logs = Path(tempfile.mkdtemp(prefix="edgefl-pi-check-"))
        logs.chmod(0o755)  # Mosquitto runs as its own user and writes its files below
        if "--reuse-install" in sys.argv and (WORK / "installs.json").exists():
            # working on the fleet part: the last run's installs, and their figures
            emu = Emulated(WORK)
            installs = json.loads((WORK / "installs.json").read_text())
        else:
            say(f"copying the root file system to {WORK}")
            shutil.rmtree(WORK, ignore_errors=True)
            run(["cp", "-a", str(ROOTFS), str(WORK)])
            emu = Emulated(WORK)
            installs = install(emu, logs)
            (WORK / "installs.json").write_text(json.dumps(installs))
        fleet = check_fleet(emu, logs)
    finally:
        LOCK.unlink(missing_ok=True)
    train, serve = installs["train"], installs["serve_only"]
    torch_wheel = next(WHEELS.glob(f"torch-{train['torch']}-*.whl"))
    result = {
        "rounds_completed": fleet["rounds_completed"],
        "serving": fleet["serving"],
        "cuda_packages": train["cuda_packages"] + serve["cuda_packages"],
        "install_s": train["install_s"],
        "venv_mb": train["venv_mb"],
        "serve_only_install_s": serve["install_s"],
        "serve_only_venv_mb": serve["venv_mb"],
        "serve_only_torch": serve["torch"],
        "torch": train["torch"],
        "torch_wheel_mb": round(torch_wheel.stat().st_size / 1e6, 1),
        "download_mb": train.get("download_mb"),
        "serve_only_download_mb": serve.get("download_mb"),
        **{k: v for k, v in fleet.items() if k not in ("rounds_completed", "serving")},
        "pins": pins,
        "logs": str(logs),
        "rootfs_build_s": None if rootfs_s is None else round(rootfs_s),
        "total_s": round(time.perf_counter() - started),
    }
    ok = (
        result["rounds_completed"] >= ROUNDS + 1
        and result["rounds_after_restart"] >= 1
        and result["serving"]
        and not result["cuda_packages"]
        and result["serve_only_torch"] is None
        and result["serve_only_trains"] is False
        and bool(result["serve_only_declined"])
    )
    result["passed"] = ok
    text = report(result)
    print(text)
    write_results("pi_check", result, text)
    print(json.dumps(result))
    return 0 if ok else 1


def report(r: dict[str, Any]) -> str:
    rows = [
        ("torch on aarch64 (wheel size, MB)", f"{r['torch']} ({r['torch_wheel_mb']})"),
        ("CUDA packages in the venvs", ", ".join(r["cuda_packages"]) or "none"),
        ("install, training device (s)", r["install_s"]),
        ("venv, training device (MB)", r["venv_mb"]),
        ("downloaded, training device (MB of wheels)", r["download_mb"]),
        ("install, serve-only device (s)", r["serve_only_install_s"]),
        ("venv, serve-only device (MB)", r["serve_only_venv_mb"]),
        ("downloaded, serve-only device (MB of wheels)", r["serve_only_download_mb"]),
        ("agent start to online (s)", r["agent_start_s"]),
        ("agent restart after SIGKILL to serving (s)", r["agent_restart_s"]),
        ("serve-only agent start to online (s)", r["serve_only_start_s"]),
        ("rounds completed", r["rounds_completed"]),
        ("  of them after the restart", r["rounds_after_restart"]),
        ("round wall times (s)", " ".join(map(str, r["round_s"]))),
        ("emulated training per round (s)", " ".join(map(str, r["train_s"]))),
        ("ONNX model served (devices serving)", f"v{r['model_version']} ({r['devices_serving']})"),
        ("serve-only: left out as", r["left_out"].get("pi-serve", "-")),
        ("serve-only: a task sent to it", r["serve_only_declined"] or "-"),
        ("root file system (s to build; - = cached)", r["rootfs_build_s"]),
        ("whole check (s)", r["total_s"]),
        ("passed", r["passed"]),
    ]
    return (
        "pi-check: device/install.sh and the agent on emulated aarch64 (Debian bookworm arm64,\n"
        "qemu-user), offline from a wheelhouse; broker and aggregator on the host\n\n"
        + table(["figure", "value"], rows)
    )


if __name__ == "__main__":
    sys.exit(main())
