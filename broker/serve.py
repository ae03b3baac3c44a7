"""Run Mosquitto for a real deployment, and enrol devices into it.

A deployment lives in one working directory: ``mosquitto.conf`` and ``acl`` (rendered from the
templates each time the broker starts), ``passwords`` (kept: it holds every enrolled device),
``aggregator.secret`` and ``monitor.secret`` (the passwords of those two accounts, 0600),
``persistence/``, ``mosquitto.log`` and, while the broker runs, ``mosquitto.pid``.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path
from types import FrameType

from edgefl.atomic import write_atomic
from edgefl.config import ConfigError, check_name

from .credentials import (
    RESERVED_USERNAMES,
    Account,
    add_account,
    generate_password,
    read_password_file,
    verify_password,
)
from .limits import DEFAULT_LIMITS, BrokerLimits
from .private import (
    DYNSEC_PLUGIN,
    BrokerError,
    ensure_dynsec_file,
    find_dynsec_plugin,
    find_mosquitto,
)
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

PID_FILE = "mosquitto.pid"
AGGREGATOR_USER = "aggregator"
MONITOR_USER = "monitor"
ADMIN_USER = "admin"


def prepare(
    fleet: str,
    workdir: str | Path,
    port: int = 1883,
    bind: str = "0.0.0.0",
    tls_cafile: str | None = None,
    tls_certfile: str | None = None,
    tls_keyfile: str | None = None,
    tls_port: int = 8883,
    plain_bind: str | None = None,
    plain: bool = True,
    *,
    limits: BrokerLimits = DEFAULT_LIMITS,
) -> Path:
    """Write a deployment's configuration into ``workdir`` and return the config file's path.

    ``bind`` is the address of both listeners unless ``plain_bind`` gives the plain one its
    own (e.g. loopback, with TLS facing the network); ``plain=False`` leaves the plain listener
    out, which needs TLS. ``limits`` (broker/limits.py) bound packets and queues. Enrolled
    devices and quarantines are kept; the aggregator, monitor and admin accounts are created if
    missing. Without Mosquitto's dynamic-security plugin the broker cannot quarantine, and
    this says so. The result also serves a system Mosquitto: point it at the returned file.
    """
    check_name("fleet", fleet)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / PERSISTENCE_DIR).mkdir(exist_ok=True)
    for path in (tls_cafile, tls_certfile, tls_keyfile):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    user = broker_user()
    dynsec_plugin = find_dynsec_plugin()
    if dynsec_plugin is None:
        log.warning(
            "this Mosquitto has no dynamic-security plugin (%s): a device that floods the fleet "
            "cannot be cut off at the broker, only ignored by the aggregator",
            DYNSEC_PLUGIN,
        )
    else:
        ensure_dynsec_file(workdir / DYNSEC_FILE)
    settings = MosquittoSettings(
        max_packet_size=limits.max_packet_size,
        max_queued_bytes=limits.max_queued_bytes,
        max_inflight_bytes=limits.max_queued_bytes,
        dynsec_plugin=dynsec_plugin,
        dynsec_file=str(workdir / DYNSEC_FILE) if dynsec_plugin else None,
        password_file=str(workdir / PASSWORD_FILE),
        acl_file=str(workdir / ACL_FILE),
        persistence_location=str(workdir / PERSISTENCE_DIR),
        log_file=str(workdir / LOG_FILE),
        port=port,
        bind=bind,
        plain_bind=plain_bind,
        plain=plain,
        user=user,
        tls_port=tls_port,
        tls_cafile=str(Path(tls_cafile).resolve()) if tls_cafile else None,
        tls_certfile=str(Path(tls_certfile).resolve()) if tls_certfile else None,
        tls_keyfile=str(Path(tls_keyfile).resolve()) if tls_keyfile else None,
        log_stderr=True,
    )
    try:
        text = render_config(settings)
    except ValueError as e:  # a listener choice that cannot work: the user's to fix
        raise ConfigError(str(e)) from None
    config_path = workdir / CONFIG_FILE
    write_text(config_path, text)
    write_text(workdir / ACL_FILE, render_acl(fleet, AGGREGATOR_USER, MONITOR_USER, ADMIN_USER))
    for username in (AGGREGATOR_USER, MONITOR_USER, ADMIN_USER):
        _ensure_account(workdir, username)
    (workdir / LOG_FILE).touch()
    if os.geteuid() == 0:
        _hand_over(workdir, user, [tls_cafile, tls_certfile, tls_keyfile])
    return config_path


def serve(
    fleet: str,
    workdir: str | Path,
    port: int = 1883,
    bind: str = "0.0.0.0",
    tls_cafile: str | None = None,
    tls_certfile: str | None = None,
    tls_keyfile: str | None = None,
    tls_port: int = 8883,
    plain_bind: str | None = None,
    plain: bool = True,
    *,
    limits: BrokerLimits = DEFAULT_LIMITS,
) -> int:
    """Run Mosquitto in the foreground for ``fleet`` until SIGINT/SIGTERM; its exit code.
    The listener options are :func:`prepare`'s."""
    workdir = Path(workdir).resolve()
    # Mosquitto would only say "Address already in use" and exit: name the port and the cure
    if plain:
        check_port_free(plain_bind or bind, port, "--port", workdir)
    if tls_cafile:
        check_port_free(bind, tls_port, "--tls-port", workdir)
    config_path = prepare(
        fleet,
        workdir,
        port,
        bind,
        tls_cafile,
        tls_certfile,
        tls_keyfile,
        tls_port,
        plain_bind=plain_bind,
        plain=plain,
        limits=limits,
    )
    log.info(
        "aggregator password is in %s; monitor password in %s; admin (edgefl readmit) in %s",
        workdir / f"{AGGREGATOR_USER}.secret",
        workdir / f"{MONITOR_USER}.secret",
        workdir / f"{ADMIN_USER}.secret",
    )
    log.info(
        "packets up to %d KiB; queues up to %d MiB per client",
        limits.max_packet_size >> 10,
        limits.max_queued_bytes >> 20,
    )
    listeners = [f"plain MQTT on {plain_bind or bind}:{port}"] if plain else []
    if tls_cafile:
        listeners.append(f"TLS on {bind}:{tls_port}")
    log.info("Mosquitto for fleet %r: %s; log %s", fleet, ", ".join(listeners), workdir / LOG_FILE)
    proc = subprocess.Popen([find_mosquitto(), "-c", str(config_path)], cwd=workdir)
    pid_path = workdir / PID_FILE
    write_text(pid_path, f"{proc.pid}\n")

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            # SIGTERM for both stop signals: Mosquitto saves its persistence and exits 0.
            proc.send_signal(signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    previous: dict[int, object] = {}
    # Signal handlers can only be set from the main thread; elsewhere the caller owns them.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, forward)
    try:
        code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        pid_path.unlink(missing_ok=True)
    # Popen reports death by signal as -N; a shell would say 128+N.
    code = 128 - code if code < 0 else code
    log.info("Mosquitto exited with code %d", code)
    return code


def check_port_free(bind: str, port: int, option: str, workdir: Path) -> None:
    """Raise :class:`BrokerError` if something already listens on ``bind``:``port``, saying
    what most likely does (a system Mosquitto on a Debian machine) and the ``option`` that
    moves our listener. Other bind errors are left for Mosquitto to report."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # as Mosquitto binds: a port in TIME_WAIT is free to it, one with a listener is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return
    pid = running_pid(workdir)
    if pid is not None:
        holder = f"the edgefl broker started from {workdir} (pid {pid}) holds it"
        fix = f"stop that one first, or give this one another port: `edgefl broker {option} N`"
    else:
        holder = "another program listens there, most likely the system's Mosquitto"
        fix = (
            "stop it (`sudo systemctl stop mosquitto`; `sudo systemctl disable mosquitto` keeps "
            f"it off after a reboot), or use another port: `edgefl broker {option} N` (and the "
            "same port in the devices' and the aggregator's [broker] port)"
        )
    raise BrokerError(f"port {port} on {bind} is already in use: {holder}", fix)


def enroll(workdir: str | Path, device_id: str) -> Account:
    """Create (or give a new password to) ``device_id``'s account in a deployment.

    The ACL's ``%u`` patterns already cover any device id, so only the password file changes.
    A broker started by :func:`serve` is told to reload; any other running broker needs a
    SIGHUP (``systemctl reload mosquitto``) before the device can log in.
    """
    check_name("device id", device_id)
    if device_id in RESERVED_USERNAMES:
        raise ConfigError(f"device id {device_id!r} is reserved for the {device_id} account")
    workdir = Path(workdir).resolve()
    account = Account(device_id, generate_password())
    add_account(workdir / PASSWORD_FILE, account.username, account.password)
    log.info("enrolled device %r in %s", device_id, workdir / PASSWORD_FILE)
    pid = running_pid(workdir)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
            log.info("told Mosquitto (pid %d) to reload its accounts", pid)
        except PermissionError:
            log.warning(
                "cannot signal Mosquitto (pid %d) as this user; run `kill -HUP %d` "
                "as root for device %r to be able to log in",
                pid,
                pid,
                device_id,
            )
    return account


def running_pid(workdir: str | Path) -> int | None:
    """The pid of the Mosquitto that :func:`serve` runs from ``workdir``, if it is alive."""
    try:
        pid = int((Path(workdir) / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    # A stale pid file may name a recycled pid; never signal a process that is not Mosquitto.
    if cmdline and b"mosquitto" not in cmdline:
        return None
    return pid


def _ensure_account(workdir: Path, username: str) -> Account:
    """Keep ``username``'s account if its secret file still matches, else make a new one."""
    secret_path = workdir / f"{username}.secret"
    entries = read_password_file(workdir / PASSWORD_FILE)
    try:
        password = secret_path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        password = ""
    if password and username in entries and verify_password(password, entries[username]):
        return Account(username, password)
    password = generate_password()
    add_account(workdir / PASSWORD_FILE, username, password)
    write_atomic(secret_path, password + "\n", mode=0o600)
    log.info("created the %r account; its password is in %s", username, secret_path)
    return Account(username, password)


def _hand_over(workdir: Path, user: str, tls_files: list[str | None]) -> None:
    """Give the files Mosquitto reads after dropping root to ``user``.

    Mosquitto 2.0 started as root switches user right after parsing its config, so the password
    file, ACL, log and persistence must belong to that user; the config too, because a SIGHUP
    re-reads it. The .secret files stay root's.
    """
    entry = pwd.getpwnam(user)
    uid, gid = entry.pw_uid, entry.pw_gid
    # Check before changing anything, so a refused directory is left as it was.
    for parent in workdir.parents:
        st = parent.stat()
        if not st.st_mode & stat.S_IXOTH and st.st_uid != uid:
            raise BrokerError(
                f"Mosquitto runs as user {user!r} and cannot enter {parent} (mode "
                f"{stat.filemode(st.st_mode)}); put the broker's workdir somewhere it can reach, "
                "e.g. /var/lib/edgefl-broker"
            )
    for tls_file in tls_files:
        if tls_file is None:
            continue
        st = Path(tls_file).stat()
        if (
            st.st_uid != uid
            and not st.st_mode & stat.S_IROTH
            and not (st.st_gid == gid and st.st_mode & stat.S_IRGRP)
        ):
            raise BrokerError(
                f"Mosquitto runs as user {user!r} and cannot read {tls_file}; "
                f"`chown {user} {tls_file}` or make it group-readable"
            )
    os.chown(workdir, uid, gid)
    for path in [
        workdir / PERSISTENCE_DIR,
        *(workdir / PERSISTENCE_DIR).iterdir(),
        workdir / PASSWORD_FILE,
        workdir / ACL_FILE,
        workdir / CONFIG_FILE,
        workdir / LOG_FILE,
        workdir / DYNSEC_FILE,
    ]:
        if path.exists():
            os.chown(path, uid, gid)
