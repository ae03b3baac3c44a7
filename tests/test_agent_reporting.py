"""What a device agent tells its operator, over the real private broker: the connection, each
task, update and model in its log; warnings while the broker is unreachable; and the two
failures no retry cures, a refused account and a device id that another agent uses, which end
`edgefl device` with exit code 2 and one line that says what to do."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker import free_port
from device.agent import DeviceAgent
from edgefl.config import BrokerConfig, DeviceConfig, to_dict, to_toml
from edgefl.data import save_npz
from tests.conftest import FLEET, wait_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.broker


def _device_toml(tmp_path: Path, data, broker: BrokerConfig, device_id: str = "dev-0") -> Path:
    save_npz(tmp_path / f"{device_id}.npz", data)
    cfg = DeviceConfig(
        fleet=FLEET,
        device_id=device_id,
        broker=broker,
        data=str(tmp_path / f"{device_id}.npz"),
        state_dir=str(tmp_path / "state" / device_id),
        telemetry_interval_s=1.0,
    )
    path = tmp_path / f"{device_id}.toml"
    path.write_text(to_toml(to_dict(cfg)))
    return path


def _edgefl_device(config: Path, stderr, *options: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch", *options, "device", "--config", str(config)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _messages(caplog, device_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(device_id)]


def test_the_agent_logs_its_connection_tasks_updates_and_models(make_fleet, caplog) -> None:
    caplog.set_level(logging.INFO)
    fleet = make_fleet(devices=2)
    fleet.start_agent(0)
    fleet.start_agent(1)
    with fleet.aggregator() as agg:
        agg.run(rounds=1)
    wait_until(
        lambda: any("update accepted by the broker" in m for m in _messages(caplog, "dev-0")),
        what="the PUBACK's line",
    )
    said = _messages(caplog, "dev-0")
    where = f"{fleet.broker.host}:{fleet.broker.port}"
    assert f"dev-0: connected to the broker at {where} as 'dev-0'" in said
    task = next(m for m in said if m.startswith("dev-0: round 1 task: "))
    assert "epoch(s)" in task and "batch 32" in task and "on model v0" in task
    sent = next(m for m in said if m.startswith("dev-0: round 1 sending update: "))
    assert int(sent.split("update: ")[1].split(" bytes")[0]) > 1000  # the dense delta's size
    assert any(m.startswith("dev-0: installed global model v0 (round 0") for m in said)
    assert any(m.startswith("dev-0: installed global model v1 (round 1") for m in said)


@pytest.mark.slow
def test_a_device_whose_broker_is_down_says_so_every_few_seconds_not_every_retry(
    tmp_path, digits
) -> None:
    port = free_port()  # nothing listens there
    config = _device_toml(tmp_path, digits[0], BrokerConfig(port=port, username="dev-0"))
    err = tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        proc = _edgefl_device(config, stderr)
    try:
        wait_until(lambda: "unreachable" in err.read_text(), timeout=20, what="a warning")
        time.sleep(4)  # paho retries after 1, 2, 4 ... s: two retries more, still one warning
        warnings = [line for line in err.read_text().splitlines() if "unreachable" in line]
        assert len(warnings) == 1, warnings
        assert f"the broker at 127.0.0.1:{port} is unreachable (Connection refused)" in warnings[0]
        assert "still trying to connect as 'dev-0'" in warnings[0]
        assert proc.poll() is None  # a broker that is down may come back: it keeps trying
    finally:
        proc.terminate()
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_refused_password_ends_edgefl_device_with_one_line_and_exit_2(
    broker, tmp_path, digits
) -> None:
    account = broker.device_account("dev-0")
    wrong = dataclasses.replace(broker.broker_config(account), password="not-its-password")
    config = _device_toml(tmp_path, digits[0], wrong)
    proc = _edgefl_device(config, subprocess.PIPE, "--log-file", str(tmp_path / "dev.log"))
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # it did not exit: the failure is reported above
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, stderr  # systemd does not restart exit 2: the unit shows failed
    assert "Traceback" not in stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith("edgefl device: the broker at ") and "refused account 'dev-0'" in line
    assert "password" in line and "edgefl enroll" in line  # the fix
    assert "Traceback" not in (tmp_path / "dev.log").read_text()


@pytest.mark.slow
def test_two_agents_with_one_device_id_are_named_and_stop_flapping(
    broker, tmp_path, digits
) -> None:
    """Mosquitto 2.0 closes a taken-over connection without saying why: the agent that loses
    its id says so once and retries every TAKEOVER_RETRY_S (60 s), so the other keeps it."""
    cfg = broker.broker_config(broker.device_account("dev-0"))
    config = _device_toml(tmp_path, digits[0], cfg)
    log = tmp_path / "first.log"
    first = _edgefl_device(config, subprocess.PIPE, "--log-file", str(log))
    second = None
    try:
        wait_until(
            lambda: log.exists() and "connected to the broker" in log.read_text(),
            timeout=30,
            what="the first agent's connection",
        )
        # the same device started a second time (here in this process): it takes the id
        dcfg = DeviceConfig(
            fleet=FLEET, device_id="dev-0", broker=cfg, state_dir=str(tmp_path / "second")
        )
        second = DeviceAgent(dcfg, digits[0]).start()
        wait_until(
            lambda: "retrying every 60 s" in log.read_text(),
            timeout=30,
            what="the first agent's line on the taken id",
        )
        text = log.read_text()
        [line] = [x for x in text.splitlines() if "retrying every 60 s" in x]
        assert "another agent" in line and "client id 'dev-0'" in line, line
        assert "stop the other one" in line  # the fix
        # no flapping: at most one "lost the broker" line, not one a second
        assert text.count("lost the broker") <= 1
        assert first.poll() is None  # suspected, not certain: it waits, it does not quit
        # the other keeps its connection while the first one waits
        assert second.failure is None
        connects = second.link.connects
        time.sleep(3)
        assert second.link.connected.is_set() and second.link.connects == connects
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if second is not None:
            second.stop()


@pytest.mark.slow
def test_a_link_without_an_owner_to_stop_retries_slowly_when_its_id_is_taken(
    broker, caplog, monkeypatch
) -> None:
    """The aggregator's case: nothing would restart it, so its link backs off instead."""
    import edgefl.mqtt as mqtt

    monkeypatch.setattr(mqtt, "TAKEOVER_RETRY_S", 3)
    caplog.set_level(logging.INFO, logger="edgefl.mqtt")
    cfg = broker.broker_config(broker.device_account("dev-0"))
    links = [mqtt.MqttLink("a", cfg).start(), mqtt.MqttLink("b", cfg)]
    try:
        links[1].start(wait=False)
        wait_until(
            lambda: any("retrying every 3 s" in r.getMessage() for r in caplog.records),
            timeout=20,
            what="the takeover's line",
        )
        said = [r.getMessage() for r in caplog.records if "retrying every" in r.getMessage()]
        assert len(said) == 1 and "client id 'dev-0'" in said[0]
        assert not any(link.failed.is_set() for link in links)  # slowed down, not stopped
        # from now on at most one takeover in each TAKEOVER_RETRY_S, not one a second
        before = sum(link.connects for link in links)
        time.sleep(3.5)
        assert sum(link.connects for link in links) - before <= 2
    finally:
        for link in links:
            link.stop()


def test_refused_credentials_fail_start_at_once_with_the_account_named(broker) -> None:
    from edgefl.mqtt import BrokerRefused, ClientIdTaken, MqttLink

    cfg = dataclasses.replace(
        broker.broker_config(broker.device_account("dev-0")), password="wrong"
    )
    started = time.monotonic()
    with pytest.raises(BrokerRefused, match="refused account 'dev-0'") as error:
        MqttLink("dev-0", cfg).start()
    assert time.monotonic() - started < cfg.connect_timeout_s / 2  # not after the timeout
    assert error.value.exit_code == 2 and "password" in error.value.fix
    assert not isinstance(error.value, ClientIdTaken)
