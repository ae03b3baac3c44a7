"""A private Mosquitto on a free loopback port, for the demo, the benchmarks and the tests.

It runs the same configuration and ACL templates as a deployment, so what the tests prove about
access rights holds for a real broker. It never touches a Mosquitto that may already run on the
machine: everything lives in its own working directory and on its own port.

One module, about 500 lines: starting, probing, accounts and stopping all act on the one
process and working directory the class owns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from edgefl.compression.indices import varint
from edgefl.config import BrokerConfig, ConfigError, check_name
from edgefl.errors import UserError

from .credentials import (
    RESERVED_USERNAMES,
    Account,
    add_accounts,
    generate_password,
    write_password_file,
)
from .limits import DEFAULT_LIMITS, BrokerLimits
from .render import (
    ACL_FILE,
    CONFIG_FILE,
    DYNSEC_FILE,
    LOG_FILE,
    PASSWORD_FILE,
    PERSISTENCE_DIR,
    MosquittoSettings,
    broker_user,
    render_acl,
    render_config,
    write_text,
)

log = logging.getLogger(__name__)

SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
INSTALL_HINT = (
    "run `sh broker/install-mosquitto.sh` from the edgefl checkout "
    "(or `sudo apt-get install mosquitto`), or set EDGEFL_MOSQUITTO to the mosquitto binary"
)


class BrokerError(UserError, RuntimeError):
    """Mosquitto could not be found, started or reloaded; the message says why (exit code 1)."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary: $EDGEFL_MOSQUITTO, then PATH, then the usual sbin dirs.

    The sbin directories are searched because Debian installs the broker in /usr/sbin, which
    is not on an ordinary user's PATH.
    """
    override = os.environ.get("EDGEFL_MOSQUITTO")
    if override:
        if os.access(override, os.X_OK):
            return override
        raise BrokerError(f"EDGEFL_MOSQUITTO={override} is not an executable file")
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in SEARCH_DIRS:
        candidate = os.path.join(directory, "mosquitto")
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(f"the Mosquitto broker is not installed: {INSTALL_HINT}")


DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
DYNSEC_DIRS = ("/usr/lib/{arch}", "/usr/lib", "/usr/local/lib", "/usr/lib/mosquitto")


def find_dynsec_plugin() -> str | None:
    """Path of Mosquitto's dynamic-security plugin (quarantines), or None if this Mosquitto has
    none: $EDGEFL_MOSQUITTO_DYNSEC, then the library directories Debian and source builds use."""
    override = os.environ.get("EDGEFL_MOSQUITTO_DYNSEC")
    if override:
        return override if os.path.isfile(override) else None
    arch = f"{os.uname().machine}-linux-gnu"
    for directory in DYNSEC_DIRS:
        candidate = os.path.join(directory.format(arch=arch), DYNSEC_PLUGIN)
        if os.path.isfile(candidate):
            return candidate
    return None


def ensure_dynsec_file(path: Path) -> None:
    """Create the plugin's file with no client in it, if there is none. An existing file holds
    quarantines that must survive a restart, so it is never overwritten. Every default is
    "deny": the plugin rules only the clients it lists, all of them disabled."""
    if path.exists():
        return
    empty = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": [],
        "groups": [],
        "roles": [],
    }
    write_text(path, json.dumps(empty, indent=1) + "\n", mode=0o600)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (never 1883, the system broker's)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port != 1883:
            return port


class PrivateBroker:
    """A Mosquitto of our own, with an aggregator, a monitor and device accounts.

    ``with PrivateBroker("demo", device_ids=["dev-0"]) as broker:`` starts it and stops it.
    Passwords are random per broker and held here; :meth:`broker_config` hands them to clients.
    """

    host: str = "127.0.0.1"

    def __init__(
        self,
        fleet: str,
        workdir: str | Path | None = None,
        port: int | None = None,
        device_ids: Iterable[str] = (),
        max_packet_size: int | None = None,
        tls: bool = False,
        limits: BrokerLimits = DEFAULT_LIMITS,
    ) -> None:
        self.fleet = check_name("fleet", fleet)
        self.aggregator = Account("aggregator", generate_password())
        self.monitor = Account("monitor", generate_password())
        # lifts quarantines; also the account that probes whether the broker is up, since a
        # login under any other would take over that client's connection (client id = username)
        self.admin = Account("admin", generate_password())
        self._devices: dict[str, Account] = {}
        for device_id in device_ids:
            if device_id not in self._devices:
                self._new_device(device_id)
        # Only now, so that a bad device id leaves no temporary directory behind.
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"edgefl-broker-{fleet}-")
        self.workdir = Path(workdir).resolve()
        self._port_given = port is not None
        self.port = port if port is not None else free_port(self.host)
        self.limits = limits
        self.max_packet_size = max_packet_size or limits.max_packet_size
        self.dynsec_plugin = find_dynsec_plugin()
        # a second listener with TLS, its certificates made by our own CA (broker/certs.py)
        self.tls = tls
        self.tls_port = free_port(self.host) if tls else None
        self.tls_files: dict[str, Path] = {}
        # Guards the account table and the process against a device_account() from another
        # thread (the demo enrols devices while the broker runs).
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        # Once clients have seen a port, a restart must come back on it.
        self._port_fixed = self._port_given

    # -- files -------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / CONFIG_FILE

    @property
    def password_path(self) -> Path:
        return self.workdir / PASSWORD_FILE

    @property
    def acl_path(self) -> Path:
        return self.workdir / ACL_FILE

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE

    @property
    def dynsec_path(self) -> Path:
        return self.workdir / DYNSEC_FILE

    def _accounts(self) -> dict[str, str]:
        accounts = [self.aggregator, self.monitor, self.admin, *self._devices.values()]
        return {a.username: a.password for a in accounts}

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / PERSISTENCE_DIR).mkdir(exist_ok=True)
        write_password_file(self.password_path, self._accounts())
        write_text(
            self.acl_path,
            render_acl(
                self.fleet, self.aggregator.username, self.monitor.username, self.admin.username
            ),
        )
        if self.dynsec_plugin:
            ensure_dynsec_file(self.dynsec_path)
        settings = MosquittoSettings(
            password_file=str(self.password_path),
            acl_file=str(self.acl_path),
            persistence_location=str(self.workdir / PERSISTENCE_DIR),
            log_file=str(self.log_path),
            port=self.port,
            bind=self.host,
            # As root, Mosquitto 2.0 would switch to user "mosquitto" before reading any of
            # these files, and that user cannot enter a root-owned 0700 temporary directory.
            # A loopback-only test broker may stay root; a deployment (serve.py) does not.
            user="root" if os.geteuid() == 0 else broker_user(),
            max_packet_size=self.max_packet_size,
            max_queued_bytes=self.limits.max_queued_bytes,
            max_inflight_bytes=self.limits.max_queued_bytes,
            dynsec_plugin=self.dynsec_plugin,
            dynsec_file=str(self.dynsec_path) if self.dynsec_plugin else None,
            **self._tls_settings(),
        )
        write_text(self.config_path, render_config(settings))

    # -- accounts ----------------------------------------------------------------------------

    def _new_device(self, device_id: str) -> Account:
        check_name("device id", device_id)
        if device_id in RESERVED_USERNAMES:
            raise ConfigError(f"device id {device_id!r} is reserved for the {device_id} account")
        account = Account(device_id, generate_password())
        self._devices[device_id] = account
        return account

    def device_account(self, device_id: str) -> Account:
        """The account of ``device_id``, created (and the running broker reloaded) if new."""
        return self.device_accounts([device_id])[0]

    def device_accounts(self, device_ids: Iterable[str]) -> list[Account]:
        """Accounts for several devices with one password-file write and one reload."""
        with self._lock:
            result: list[Account] = []
            new: list[Account] = []
            for device_id in device_ids:
                account = self._devices.get(device_id)
                if account is None:
                    account = self._new_device(device_id)
                    new.append(account)
                result.append(account)
            if new and self.running:
                add_accounts(self.password_path, {a.username: a.password for a in new})
                self._reload(probe=new[-1])
            return result

    def _tls_settings(self) -> dict[str, object]:
        if not self.tls:
            return {}
        if not self.tls_files:
            from .certs import make_certificates

            self.tls_files = make_certificates(self.workdir / "tls", [self.host, "localhost"])
        return {
            "tls_port": self.tls_port,
            "tls_cafile": str(self.tls_files["ca.crt"]),
            "tls_certfile": str(self.tls_files["server.crt"]),
            "tls_keyfile": str(self.tls_files["server.key"]),
        }

    def broker_config(self, account: Account | None, tls: bool = False) -> BrokerConfig:
        """How a client reaches this broker as ``account`` (``None``: anonymously); with
        ``tls`` over the TLS listener, verifying the broker against our CA."""
        if tls and not self.tls:
            raise BrokerError("this broker was started without tls=True")
        return BrokerConfig(
            host=self.host,
            port=self.tls_port if tls else self.port,
            username=account.username if account else None,
            password=account.password if account else None,
            tls_ca=str(self.tls_files["ca.crt"]) if tls else None,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start Mosquitto and return once it accepts logins (``BrokerError`` if it cannot)."""
        with self._lock:
            self._start(timeout_s)

    def _start(self, timeout_s: float) -> None:
        if self.running:
            return
        binary = find_mosquitto()
        attempts = 1 if self._port_fixed else 5
        for attempt in range(1, attempts + 1):
            self._write_files()
            self._spawn(binary)
            try:
                self._wait_until_listening(timeout_s)
                break
            except BrokerError as e:
                self._terminate()
                # A port picked by free_port() can be taken by someone else before Mosquitto
                # binds it; pick another rather than fail a test run.
                if "Address already in use" in str(e) and attempt < attempts:
                    log.info("port %d was taken meanwhile; trying another", self.port)
                    self.port = free_port(self.host)
                    continue
                raise
        self._port_fixed = True
        log.info(
            "private Mosquitto for fleet %r on %s:%d (pid %d, dir %s)",
            self.fleet,
            self.host,
            self.port,
            self._proc.pid if self._proc else -1,
            self.workdir,
        )

    def _spawn(self, binary: str) -> None:
        # stdout/stderr go to the same file as Mosquitto's own log: messages written before
        # its log is open (a bad config line, a refused bind) then sit where users look.
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Its own session, so a Ctrl-C meant for the demo does not kill the broker
                # before the devices and the aggregator have said goodbye through it.
                start_new_session=True,
            )
        # If this object is dropped without stop(), do not leave a broker behind.
        self._finalizer = weakref.finalize(self, _kill, self._proc)

    def _wait_until_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"Mosquitto exited with code {self._proc.returncode} while starting on port "
                    f"{self.port}; end of {self.log_path}:\n{self.log_tail()}"
                )
            # A login with the aggregator's random password, not a bare TCP connect: another
            # program listening on the port would accept the connection, but not this login.
            try:
                if mqtt_login_ok(
                    self.host, self.port, self.admin.username, self.admin.password, timeout_s=0.5
                ):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"Mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{timeout_s:.0f} s; end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop Mosquitto (it saves its persistence first) and remove a temporary workdir."""
        with self._lock:
            self._terminate()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port and persistence."""
        with self._lock:
            self._terminate()
            if down_s > 0:
                time.sleep(down_s)
            self._start(timeout_s=10.0)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM lets Mosquitto write its persistence database; SIGKILL only if it hangs.
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("Mosquitto (pid %d) ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()

    def _reload(self, probe: Account, timeout_s: float = 10.0) -> None:
        """SIGHUP the broker and wait until ``probe`` can log in, i.e. the reload is done.

        Mosquitto only notes the signal and re-reads its files on its next loop turn, so a
        client connecting straight after the kill() could still be refused.
        """
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running:
                raise BrokerError(
                    f"Mosquitto exited during a reload; end of log:\n{self.log_tail()}"
                )
            try:
                if mqtt_login_ok(self.host, self.port, probe.username, probe.password):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"Mosquitto did not accept {probe.username!r} within "
                    f"{timeout_s:.0f} s of a reload; end of log:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the broker's log (empty if there is none yet)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PrivateBroker(fleet={self.fleet!r}, port={self.port}, {state})"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def mqtt_login_ok(
    host: str, port: int, username: str, password: str, timeout_s: float = 2.0
) -> bool:
    """Whether the broker accepts this login: one MQTT 3.1.1 CONNECT, then DISCONNECT.

    A raw packet rather than an MQTT client keeps this synchronous and free of threads; it is
    used to confirm that a reload has taken effect.
    """
    client_id = f"edgefl-probe-{os.getpid()}-{time.monotonic_ns() % 10**9}"

    def field(value: str) -> bytes:
        data = value.encode("utf-8")
        return struct.pack("!H", len(data)) + data

    # Protocol "MQTT" level 4; flags: username, password, clean session; keepalive 10 s.
    body = field("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 10)
    body += field(client_id) + field(username) + field(password)
    packet = bytes([0x10]) + varint(len(body)) + body
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(packet)
        connack = _recv_exactly(s, 4)
        accepted = connack[0] == 0x20 and connack[3] == 0
        if accepted:
            s.sendall(b"\xe0\x00")  # DISCONNECT, so no Last Will and a clean log line
        return accepted


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection before CONNACK")
        data += chunk
    return data
