"""monitor/fleet.py against the private Mosquitto: the operators' picture of a fleet, built from
retained status, telemetry and the aggregator's status alone, robust to what devices send."""

from __future__ import annotations

import json
import threading

import pytest

from edgefl.messages import AggregatorStatus, Status, Telemetry
from edgefl.mqtt import BrokerUnavailable, MqttLink
from edgefl.topics import Topics
from monitor.fleet import FleetView
from tests.conftest import FLEET, wait_until

TOPICS = Topics(FLEET)


def _device(broker, device_id: str) -> MqttLink:
    link = MqttLink(device_id, broker.broker_config(broker.device_account(device_id)),
                    clean_start=True)
    return link.start()


def _view(broker, **kw) -> FleetView:
    return FleetView(FLEET, broker.broker_config(broker.monitor), **kw)


def test_the_view_shows_devices_and_the_aggregator_and_skips_what_is_invalid(broker) -> None:
    a, b = _device(broker, "dev-a"), _device(broker, "dev-b")
    agg = MqttLink("aggregator", broker.broker_config(broker.aggregator), clean_start=True).start()
    try:
        reading = Telemetry(cpu_percent=12.5, mem_available_mb=300.0, samples=40,
                            battery_percent=81.0, charging=False, link_kbps=900.0, ts=1000.0)
        birth = Status("online", agent_version="0.1.0", telemetry=reading, serving=3,
                       serving_variant="int8", ts=999.0)
        a.publish(TOPICS.status("dev-a"), birth.to_payload(), retain=True).wait_for_publish(5)
        b.publish(TOPICS.status("dev-b"), b"{not json", retain=True).wait_for_publish(5)
        agg.publish(TOPICS.aggregator_status,
                    AggregatorStatus("online", round=2, reported=1, expected=3).to_payload(),
                    retain=True).wait_for_publish(5)
        # retained before the view starts: it sees them as soon as it subscribes
        with _view(broker, enrolled=["dev-a", "dev-b", "dev-c"]) as view:
            wait_until(lambda: view.snapshot()["aggregator"] is not None
                       and view.snapshot()["devices"]["dev-a"]["state"] == "online",
                       what="the retained messages")
            wait_until(lambda: view.invalid.get("malformed") == 1, what="the bad status counted")
            g = view.generation
            newer = Telemetry(cpu_percent=50.0, mem_available_mb=200.0, samples=40,
                              battery_percent=79.0, charging=True, ts=1010.0)
            a.publish(TOPICS.telemetry("dev-a"), newer.to_payload(), qos=0)
            b.publish(TOPICS.telemetry("dev-b"), json.dumps({"v": 2, "cpu_percent": -1}).encode(),
                      qos=0)
            assert view.wait_change(g, 5.0) > g
            wait_until(lambda: view.snapshot()["devices"]["dev-a"]["telemetry"]["ts"] == 1010.0,
                       what="the live telemetry")
            wait_until(lambda: sum(view.invalid.values()) == 2, what="the bad telemetry counted")
            snap = json.loads(json.dumps(view.snapshot()))  # JSON as it is
    finally:
        for link in (a, b, agg):
            link.stop()
    dev_a = snap["devices"]["dev-a"]
    assert dev_a["state"] == "online" and dev_a["enrolled"] is True
    assert dev_a["serving"] == 3 and dev_a["serving_variant"] == "int8"
    assert dev_a["agent_version"] == "0.1.0"
    assert dev_a["telemetry"]["battery_percent"] == 79.0 and dev_a["telemetry"]["charging"]
    assert dev_a["last_seen"] == 1010.0
    # dev-b sent nothing valid, dev-c nothing at all: known, never seen
    assert snap["devices"]["dev-b"]["state"] == "unknown"
    assert snap["devices"]["dev-c"] == snap["devices"]["dev-c"] | {
        "state": "unknown", "telemetry": None, "last_seen": None}
    assert snap["counts"] == {"online": 1, "offline": 0, "unknown": 2}
    assert snap["aggregator"]["round"] == 2 and snap["aggregator"]["expected"] == 3
    assert snap["invalid"] == {"malformed": 2}


def test_a_device_that_dies_turns_offline_and_keeps_what_its_birth_said(broker) -> None:
    a = _device(broker, "dev-a")
    with _view(broker) as view:
        changed = threading.Event()
        remove = view.add_listener(changed.set)
        a.publish(TOPICS.status("dev-a"), Status("online", serving=7).to_payload(), retain=True)
        wait_until(lambda: view.snapshot()["devices"].get("dev-a", {}).get("state") == "online",
                   what="the birth")
        assert changed.is_set()
        remove()
        # the agent's Last Will, as the broker publishes it for a dead connection
        a.publish(TOPICS.status("dev-a"), Status("offline").to_payload(), retain=True)
        wait_until(lambda: view.snapshot()["devices"]["dev-a"]["state"] == "offline",
                   what="the Will")
        dev = view.snapshot()["devices"]["dev-a"]
    a.stop()
    assert dev["serving"] == 7 and dev["online_since"] is None
    assert dev["enrolled"] is None  # no list was given


def test_the_view_never_subscribes_to_models_or_updates(broker) -> None:
    view = _view(broker)
    filters = set(view.link._subs)
    assert filters == {TOPICS.all_devices("status"), TOPICS.all_devices("telemetry"),
                       TOPICS.aggregator_status}


def test_wrong_credentials_are_refused_with_a_clear_error(broker) -> None:
    cfg = broker.broker_config(broker.monitor)
    cfg.password = "wrong"
    cfg.connect_timeout_s = 3.0
    with pytest.raises(BrokerUnavailable, match="refused"):
        FleetView(FLEET, cfg).start()


def test_no_payload_breaks_the_view_or_its_snapshot() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from edgefl.config import BrokerConfig

    view = FleetView(FLEET, BrokerConfig())  # never started: its handlers are called here
    valid = {
        "status": Status("online", serving=1, telemetry=Telemetry(1.0, 2.0, 3)).to_payload(),
        "telemetry": Telemetry(1.0, 2.0, 3).to_payload(),
        "aggregator": AggregatorStatus("online", round=1, devices={"d": {"rounds": 1}},
                                       missing=["d"]).to_payload(),
    }
    handlers = {"status": view._on_status, "telemetry": view._on_telemetry,
                "aggregator": view._on_aggregator}
    topics = {"status": TOPICS.status("dev-1"), "telemetry": TOPICS.telemetry("dev-1"),
              "aggregator": TOPICS.aggregator_status}
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                    max_size=4),
        max_leaves=10,
    )

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(kind=st.sampled_from(sorted(handlers)), raw=st.binary(max_size=200),
           key=st.text(max_size=20), value=json_values, mode=st.integers(0, 2),
           topic=st.sampled_from(["", "edgefl/test/devices/Bad/status", None]))
    def feed(kind, raw, key, value, mode, topic):
        if mode == 0:
            payload = raw
        else:
            obj = json.loads(valid[kind])
            obj[key if mode == 1 else next(iter(obj))] = value
            payload = json.dumps(obj).encode()
        handlers[kind](topic if topic is not None else topics[kind], payload)
        json.dumps(view.snapshot(), allow_nan=False)  # what a dashboard serves as it is

    feed()
    assert sum(view.invalid.values()) > 0
