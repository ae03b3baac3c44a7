"""One enrolled device turned hostile, with its own broker credentials, against a fleet set up
from broker/'s configuration: it cannot stop training with a crafted birth, cannot take over
anyone's connection, and cannot flood its neighbours out; it is quarantined at the broker
until an operator re-admits it (aggregator/guard.py, edgefl/dynsec.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.properties import Properties

from aggregator.checkpoint import Checkpointer
from broker.private import mqtt_login_ok
from edgefl import dynsec
from edgefl.config import to_dict, to_toml
from edgefl.messages import FORMAT_VERSION, AggregatorStatus
from edgefl.mqtt import MqttLink
from launch import cli
from tests.conftest import FLEET, wait_until

pytestmark = pytest.mark.broker


def _client(broker, account, client_id: str, clean: bool = True) -> paho.Client:
    c = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
    )
    c.username_pw_set(account.username, account.password)
    c.connect(broker.host, broker.port, clean_start=clean, properties=Properties(1))
    c.loop_start()
    return c


def test_a_birth_the_checkpoint_cannot_hold_is_rejected_and_rounds_go_on(make_fleet) -> None:
    fleet = make_fleet(devices=2)
    for i in range(2):
        fleet.start_agent(i)
    agg = fleet.aggregator()
    hostile = fleet.broker.device_account("dev-9")
    with agg:
        # the attack as reported: a valid-looking birth whose capabilities hold an integer
        # beyond 64 bits, retained so that every restart reads it again
        birth = {"v": FORMAT_VERSION, "state": "online", "agent_version": "0.1.0",
                 "capabilities": {"samples": 10**30}}
        c = _client(fleet.broker, hostile, "x")
        c.publish(f"edgefl/{FLEET}/devices/dev-9/status", json.dumps(birth), qos=1,
                  retain=True).wait_for_publish(5)
        wait_until(lambda: agg.guard.rejected["status/malformed"] >= 1, what="rejection")
        assert agg.registry.get("dev-9") is None  # nothing of it was stored
        metrics = agg.run(rounds=2)
        c.loop_stop()
    assert [m.reported for m in metrics] == [2, 2]
    state = Checkpointer(Path(agg.cfg.state_dir) / "checkpoint.msgpack").load()
    assert state["next_round"] == 3 and state["version"] == 2
    # a restarted aggregator reads the retained birth again, rejects it again, and trains on
    again = fleet.aggregator()
    with again:
        wait_until(lambda: again.guard.rejected["status/malformed"] >= 1, what="rejection")
        again.run(rounds=3)
    assert again.history[-1].round == 3 and again.history[-1].reported == 2


@pytest.mark.parametrize("victim", ["aggregator", "device"])
def test_a_device_cannot_take_over_another_connection(make_fleet, victim) -> None:
    fleet = make_fleet(devices=1)
    agent = fleet.start_agent(0)
    agg = fleet.aggregator()
    with agg:
        link = agg.link if victim == "aggregator" else agent.link
        assert link.connects == 1
        attacker = fleet.broker.device_account("dev-9")
        # every client id the victim is or was known by
        names = ["aggregator", f"edgefl-{FLEET}-aggregator"] if victim == "aggregator" else [
            "dev-0", f"edgefl-{FLEET}-dev-0"]
        for name in names:
            for clean in (True, False):
                c = _client(fleet.broker, attacker, name, clean)
                wait_until(c.is_connected, what="the attacker's login")
                c.disconnect()
                c.loop_stop()
        time.sleep(0.5)
        # the victim never lost its connection ...
        assert link.connected.is_set() and link.connects == 1
        # ... nor its session: dropped and back, the broker still holds it
        link.abort()
        link.start(wait=True)
        assert link.connects == 2 and link.session_present
    log = fleet.broker.log_path.read_text()
    assert "as dev-9 " in log  # the attacker got its own identity, whatever it asked for


def _flood(broker, account, device_id: str, n: int, size: int, qos: int) -> dict[str, float]:
    """Publish ``n`` junk messages on the device's own update topic as fast as paho goes."""
    gone = threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv5)
    c.username_pw_set(account.username, account.password)
    c.on_disconnect = lambda *_a: gone.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    wait_until(c.is_connected, what="the flooder's login")
    started = time.monotonic()
    junk = bytes(size)
    sent = 0
    for _ in range(n):
        if gone.is_set():
            break
        c.publish(f"edgefl/{FLEET}/devices/{device_id}/update", junk, qos=qos)
        sent += 1
    gone.wait(10)
    c.loop_stop()
    return {"sent": sent, "cut_off_s": time.monotonic() - started, "cut_off": gone.is_set()}


def test_a_flooding_device_is_quarantined_at_the_broker_and_readmitted(make_fleet, tmp_path):
    fleet = make_fleet(devices=2)
    for i in range(2):
        fleet.start_agent(i)
    agg = fleet.aggregator()
    hostile = fleet.broker.device_account("dev-9")
    statuses: list[AggregatorStatus] = []
    watcher = MqttLink("w", fleet.broker.broker_config(fleet.broker.monitor), clean_start=True)
    watcher.subscribe(f"edgefl/{FLEET}/aggregator/status",
                      lambda _t, p: statuses.append(AggregatorStatus.from_payload(p)))
    with agg, watcher:
        result = _flood(fleet.broker, hostile, "dev-9", 20_000, 1024, qos=0)
        assert result["cut_off"], "the broker never closed the flooder's connection"
        assert result["sent"] < 20_000
        assert "dev-9" in agg.guard.quarantined
        assert not agg.registry.is_online("dev-9")
        # cut off at the broker: its own password no longer lets it in
        assert not mqtt_login_ok(fleet.broker.host, fleet.broker.port, "dev-9", hostile.password)
        wait_until(lambda: any("dev-9" in s.quarantined for s in statuses),
                   what="the quarantine in the aggregator's retained status")
        # its neighbours train on, every one of them in every round
        assert [m.reported for m in agg.run(rounds=3)] == [2, 2, 2]

        # the operator's commands: list, then re-admit
        cfg_path = tmp_path / "aggregator.toml"
        cfg_path.write_text(to_toml(to_dict(agg.cfg)))
        secret = tmp_path / "admin.secret"
        secret.write_text(fleet.broker.admin.password + "\n")
        listing = dynsec.send(fleet.broker.broker_config(fleet.broker.admin),
                              dynsec.list_clients())
        assert "dev-9" in dynsec.quarantined(listing[0])
        args = ["readmit", "--config", str(cfg_path), "--admin-secret", str(secret)]
        assert cli.main([*args, "dev-9"]) == 0
        assert mqtt_login_ok(fleet.broker.host, fleet.broker.port, "dev-9", hostile.password)
        assert agg.link.connects == 1  # the operator's tool never touched the aggregator's link


def test_a_device_sending_invalid_updates_is_quarantined(make_fleet) -> None:
    fleet = make_fleet(devices=1)
    fleet.start_agent(0)
    agg = fleet.aggregator()
    hostile = fleet.broker.device_account("dev-9")
    limit = agg.cfg.quarantine.max_invalid
    with agg:
        # slowly, under the rate limit: it is the invalid messages that count
        c = _client(fleet.broker, hostile, "dev-9")
        wait_until(c.is_connected, what="login")
        for i in range(limit + 1):
            junk = bytes([0xC1, FORMAT_VERSION]) + b"junk%d" % i  # an update header, then junk
            c.publish(f"edgefl/{FLEET}/devices/dev-9/update", junk, qos=1)
            time.sleep(0.01)
        wait_until(lambda: "dev-9" in agg.guard.quarantined, what="the quarantine")
        wait_until(lambda: not c.is_connected(), what="the broker to close its connection")
        c.loop_stop()
        assert agg.guard.rejected["update/malformed"] == limit + 1
        assert agg.rejected["malformed"] == limit + 1


def test_a_device_quarantined_by_mistake_comes_back_once_readmitted(make_fleet) -> None:
    fleet = make_fleet(devices=1)
    agent = fleet.start_agent(0)
    cfg = fleet.aggregator_config()
    cfg.quarantine.hold_s = 1.0
    agg = fleet.aggregator(cfg)
    admin = fleet.broker.broker_config(fleet.broker.admin)
    with agg:
        agg.guard.quarantine("dev-0", "an operator's test")
        wait_until(lambda: not agent.link.connected.is_set(), what="the broker to cut it off")
        assert not agg.registry.is_online("dev-0")
        assert "dev-0" in dynsec.quarantined(dynsec.send(admin, dynsec.list_clients())[0])
        dynsec.send(admin, dynsec.readmit("dev-0"))
        # the agent kept trying, with backoff, and is let in again; once the guard's hold is
        # over, what it sends puts it back in the fleet
        wait_until(lambda: agent.link.connects == 2, timeout=40, what="the agent to reconnect")
        wait_until(lambda: agg.registry.is_online("dev-0"), what="it to count as online again")
        assert "dev-0" not in agg.guard.quarantined
        assert [m.reported for m in agg.run(rounds=1)] == [1]


def test_a_quarantine_survives_a_broker_restart(make_fleet) -> None:
    fleet = make_fleet(devices=1)
    fleet.start_agent(0)
    agg = fleet.aggregator()
    hostile = fleet.broker.device_account("dev-9")
    admin = fleet.broker.broker_config(fleet.broker.admin)
    with agg:
        agg.guard.quarantine("dev-9", "a test")
        wait_until(
            lambda: not mqtt_login_ok(fleet.broker.host, fleet.broker.port, "dev-9",
                                      hostile.password),
            what="the broker to refuse it",
        )
    fleet.broker.restart()
    # the plugin's file holds the quarantine: still refused, until an operator lifts it
    assert not mqtt_login_ok(fleet.broker.host, fleet.broker.port, "dev-9", hostile.password)
    assert "dev-9" in dynsec.quarantined(dynsec.send(admin, dynsec.list_clients())[0])
    dynsec.send(admin, dynsec.readmit("dev-9"))
    assert mqtt_login_ok(fleet.broker.host, fleet.broker.port, "dev-9", hostile.password)
