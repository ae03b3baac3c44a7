"""`edgefl enroll`, run as a user runs it: against a broker directory, with the config files it
writes loaded as a device would load them and used to log in to a broker served from there."""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.enrolled import LIST_FILE, EnrolledDevices, read_ids
from broker import free_port, mqtt_login_ok, prepare, read_password_file
from edgefl.config import DeviceConfig, load
from edgefl.mqtt import MqttLink
from launch.cli import main as edgefl
from tests.test_broker_listeners import FLEET, deployment_dir, edgefl_broker, wait_for


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    workdir = deployment_dir()
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


def enroll(broker_dir: Path, out: Path, *args: str) -> int:
    return edgefl(["enroll", "--dir", str(broker_dir), "--fleet", FLEET, "--out", str(out), *args])


def test_an_enrolled_device_logs_in_and_is_on_the_aggregators_list(
    broker_dir: Path, tmp_path: Path, capsys
) -> None:
    port = free_port()
    out = tmp_path / "enrolled"
    with edgefl_broker(broker_dir, "--bind", "127.0.0.1", "--port", str(port)) as code:
        wait_for(lambda: (broker_dir / "mosquitto.pid").exists(), "the broker to start")
        secret = (broker_dir / "aggregator.secret").read_text().strip()
        wait_for(lambda: mqtt_login_ok("127.0.0.1", port, "aggregator", secret), "the broker")
        args = ("--host", "127.0.0.1", "--port", str(port))
        assert enroll(broker_dir, out, "pi-kitchen", "pi-garage", *args) == 0

        path = out / "pi-kitchen.toml"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the device's password
        cfg = load(DeviceConfig, path)
        assert (cfg.fleet, cfg.device_id) == (FLEET, "pi-kitchen")
        assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls_ca) == ("127.0.0.1", port, None)
        assert cfg.broker.username == "pi-kitchen"
        # the running broker was told to reload its accounts; no restart
        wait_for(
            lambda: mqtt_login_ok("127.0.0.1", port, "pi-kitchen", cfg.broker.password),
            "the new account",
        )
        link = MqttLink("test-enrolled", cfg.broker).start()  # as the device agent connects
        link.stop()
    assert code == [0]

    registry = broker_dir / LIST_FILE
    assert read_ids(registry) == {"pi-kitchen", "pi-garage"}
    assert "pi-kitchen" in EnrolledDevices(registry)
    assert str(registry) in capsys.readouterr().out  # it says where the list went


def test_registry_elsewhere_and_enrolling_again(broker_dir: Path, tmp_path: Path) -> None:
    prepare(FLEET, broker_dir)  # a broker directory; the broker need not run
    registry = tmp_path / "etc" / "devices.txt"
    for _ in range(2):  # a second enrolment gives a new password, not a second list entry
        assert enroll(broker_dir, tmp_path, "pi-a", "--host", "b", "--registry", str(registry)) == 0
    assert registry.read_text().splitlines() == ["pi-a"]
    assert not (broker_dir / LIST_FILE).exists()


@pytest.mark.parametrize(
    ("options", "port"),
    [
        ((), 1883),
        (("--tls-ca", "/etc/edgefl/ca.crt"), 8883),
        (("--tls-ca", "/etc/edgefl/ca.crt", "--port", "9883"), 9883),
        (("--port", "1884"), 1884),
    ],
)
def test_tls_ca_makes_the_tls_port_the_default(
    broker_dir: Path, tmp_path: Path, options: tuple[str, ...], port: int
) -> None:
    prepare(FLEET, broker_dir)
    assert enroll(broker_dir, tmp_path, "pi-a", "--host", "broker.lan", *options) == 0
    cfg = load(DeviceConfig, tmp_path / "pi-a.toml")
    assert cfg.broker.port == port
    assert cfg.broker.tls_ca == ("/etc/edgefl/ca.crt" if "--tls-ca" in options else None)


def test_a_bad_id_enrols_none_of_them(broker_dir: Path, tmp_path: Path, capsys) -> None:
    prepare(FLEET, broker_dir)
    assert enroll(broker_dir, tmp_path, "pi-a", "aggregator", "--host", "b") == 2
    assert "reserved" in capsys.readouterr().err
    assert "pi-a" not in read_password_file(broker_dir / "passwords")
    assert not (tmp_path / "pi-a.toml").exists()
    assert not (broker_dir / LIST_FILE).exists()


def test_data_and_state_paths_per_device(broker_dir: Path, tmp_path: Path) -> None:
    # several devices on one machine (the local walkthrough) need their own data and state
    prepare(FLEET, broker_dir)
    args = ("--host", "b", "--data", "fleet/{id}/data.npz", "--state-dir", "fleet/{id}/state")
    assert enroll(broker_dir, tmp_path, "dev-1", "dev-2", *args) == 0
    for device_id in ("dev-1", "dev-2"):
        cfg = load(DeviceConfig, tmp_path / f"{device_id}.toml")
        assert (cfg.data, cfg.state_dir) == (
            f"fleet/{device_id}/data.npz",
            f"fleet/{device_id}/state",
        )
    assert enroll(broker_dir, tmp_path, "pi-a", "--host", "b") == 0  # a Pi's defaults stay
    cfg = load(DeviceConfig, tmp_path / "pi-a.toml")
    assert (cfg.data, cfg.state_dir) == ("/var/lib/edgefl/data.npz", "/var/lib/edgefl/device")
