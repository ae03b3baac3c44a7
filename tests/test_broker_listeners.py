"""The broker's listeners: the plain one can have its own address, or be left out, so that a
broker whose TLS listener faces the network need not offer clear-text logins there too.

The real checks run `edgefl broker` itself against Mosquitto, on two loopback addresses
(127.0.0.1 and 127.0.0.2; Linux routes all of 127.0.0.0/8 to the loopback interface).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker import MosquittoSettings, free_port, mqtt_login_ok, render_config
from broker.certs import make_certificates
from broker.render import broker_user
from edgefl.config import BrokerConfig, ConfigError
from edgefl.mqtt import MqttLink
from launch.cli import main as edgefl
from tests.conftest import wait_until

pytestmark = pytest.mark.broker

FLEET = "testfleet"
TIMEOUT = 10.0
BASE = dict(password_file="/p", acl_file="/a", persistence_location="/d", log_file="/l")
TLS = dict(tls_cafile="/ca", tls_certfile="/c", tls_keyfile="/k")


def _listeners(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("listener ")]


def test_plain_listener_follows_bind_unless_given_its_own() -> None:
    both = render_config(MosquittoSettings(**BASE, bind="10.0.0.1", **TLS))
    assert _listeners(both) == ["listener 1883 10.0.0.1", "listener 8883 10.0.0.1"]
    split = render_config(MosquittoSettings(**BASE, plain_bind="127.0.0.1", **TLS))
    assert _listeners(split) == ["listener 1883 127.0.0.1", "listener 8883 0.0.0.0"]


def test_plain_listener_can_be_left_out_only_with_tls() -> None:
    tls_only = render_config(MosquittoSettings(**BASE, plain=False, **TLS))
    assert _listeners(tls_only) == ["listener 8883 0.0.0.0"]
    # without TLS there would be no listener at all, and Mosquitto would quietly fall back to
    # its own default (1883 on loopback) instead of what was asked for
    with pytest.raises(ValueError, match="TLS"):
        render_config(MosquittoSettings(**BASE, plain=False))


@pytest.mark.parametrize(
    ("key", "address"),
    [
        ("bind", ""),
        ("plain_bind", "127.0.0.1 8883"),
        ("plain_bind", "127.0.0.1\nallow_anonymous true"),
        ("bind", "0.0.0.0\nlistener 1884"),
    ],
)
def test_an_address_cannot_smuggle_in_other_settings(key: str, address: str) -> None:
    with pytest.raises(ValueError, match="address"):
        render_config(MosquittoSettings(**BASE, **{key: address}))


def test_prepare_refuses_no_plain_listener_without_tls() -> None:
    from broker import prepare

    workdir = Path(tempfile.mkdtemp(prefix="edgefl-listeners-"))
    try:
        with pytest.raises(ConfigError, match="TLS"):
            prepare(FLEET, workdir, plain=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def edgefl_broker(workdir: Path, *options: str) -> Iterator[list[int]]:
    """`edgefl broker --dir workdir --fleet FLEET options…` in a thread; stopped with SIGTERM
    as systemd would. Yields the list that receives the command's exit code."""
    code: list[int] = []
    runner = threading.Thread(
        target=lambda: code.append(
            edgefl(["broker", "--dir", str(workdir), "--fleet", FLEET, *options])
        ),
        daemon=True,
    )
    runner.start()
    try:
        yield code
    finally:
        pid_file = workdir / "mosquitto.pid"
        deadline = time.monotonic() + TIMEOUT
        while not pid_file.exists() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        runner.join(TIMEOUT)
        assert not runner.is_alive(), "edgefl broker did not stop"


def deployment_dir() -> Path:
    # Not under pytest's tmp_path: that is 0700 root's, and a root-started Mosquitto drops to
    # user "mosquitto", which prepare() refuses with a clear error when it cannot get in.
    return Path(tempfile.mkdtemp(prefix="edgefl-deploy-"))


def wait_for(check, what: str, timeout: float = TIMEOUT) -> None:
    wait_until(check, timeout, what, retry_on=(OSError,))


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2.0).close()
    except ConnectionRefusedError:
        return True
    return False


def _tls_login(host: str, port: int, ca: Path, secret: str) -> None:
    cfg = BrokerConfig(
        host=host,
        port=port,
        username="aggregator",
        password=secret,
        tls_ca=str(ca),
        connect_timeout_s=5.0,
    )
    link = MqttLink(f"test-tls-{port}", cfg).start()  # raises if it cannot log in
    link.stop()


@pytest.mark.parametrize("mode", ["plain-bind", "no-plain"])
def test_tls_faces_the_network_and_the_plain_listener_does_not(mode: str) -> None:
    workdir = deployment_dir()
    try:
        certs = make_certificates(workdir / "tls", ["127.0.0.2"])
        if os.geteuid() == 0:
            # the broker reads its key after dropping to its own user (broker/README.md)
            entry = pwd.getpwnam(broker_user())
            os.chown(certs["server.key"], entry.pw_uid, entry.pw_gid)
        port, tls_port = free_port(), free_port()
        listener_option = ["--plain-bind", "127.0.0.1"] if mode == "plain-bind" else ["--no-plain"]
        with edgefl_broker(
            workdir,
            "--bind",
            "127.0.0.2",
            "--port",
            str(port),
            "--tls-port",
            str(tls_port),
            "--tls-ca",
            str(certs["ca.crt"]),
            "--tls-cert",
            str(certs["server.crt"]),
            "--tls-key",
            str(certs["server.key"]),
            *listener_option,
        ) as code:
            # the secret is written before Mosquitto starts, so it is whole once TLS listens
            wait_for(lambda: not _refused("127.0.0.2", tls_port), "the TLS listener")
            secret = (workdir / "aggregator.secret").read_text().strip()
            _tls_login("127.0.0.2", tls_port, certs["ca.crt"], secret)
            assert _refused("127.0.0.1", tls_port)  # TLS listens where --bind says, only
            assert _refused("127.0.0.2", port)  # no clear-text logins on the network side
            if mode == "plain-bind":
                assert mqtt_login_ok("127.0.0.1", port, "aggregator", secret)
            else:
                assert _refused("127.0.0.1", port)
        assert code == [0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_no_plain_without_tls_is_a_configuration_error(capsys) -> None:
    workdir = deployment_dir()
    try:
        assert edgefl(["broker", "--dir", str(workdir), "--fleet", FLEET, "--no-plain"]) == 2
        assert "TLS" in capsys.readouterr().err
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_packet_limit_can_be_capped_and_clients_learn_it(capsys) -> None:
    workdir = deployment_dir()
    try:
        port = free_port()
        options = ["--bind", "127.0.0.1", "--port", str(port), "--model", "mlp_mnist"]
        with edgefl_broker(workdir, *options, "--max-packet-bytes", "262144") as code:
            wait_for(lambda: not _refused("127.0.0.1", port), "the listener")
            secret = (workdir / "aggregator.secret").read_text().strip()
            cfg = BrokerConfig(port=port, username="aggregator", password=secret)
            link = MqttLink("test-limit", cfg).start()
            try:
                # mlp_mnist alone would get 504 KiB; the cap is what its CONNACK says
                assert link.max_packet_size == link.packet_limit == 262144
            finally:
                link.stop()
        assert code == [0]
        # too small for a chunk and its headers: refused before anything starts
        assert edgefl(["broker", "--dir", str(workdir), "--fleet", FLEET,
                       "--max-packet-bytes", "1000"]) == 2
        assert "too small" in capsys.readouterr().err
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
