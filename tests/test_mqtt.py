"""edgefl/mqtt.py against a real Mosquitto: publishes timed until their PUBACK."""

from __future__ import annotations

import threading

from edgefl.mqtt import MqttLink
from tests.conftest import FLEET, wait_until


def _watcher(broker) -> tuple[MqttLink, list[bytes]]:
    seen: list[bytes] = []
    watcher = MqttLink("test-watcher", broker.broker_config(broker.monitor), clean_start=True)
    watcher.subscribe(f"edgefl/{FLEET}/devices/+/update", lambda _t, p: seen.append(p))
    return watcher, seen


def test_a_timed_publish_reports_its_time_to_the_puback_once(broker):
    times: list[float] = []
    account = broker.device_account("dev-0")
    topic = f"edgefl/{FLEET}/devices/dev-0/update"
    watcher, seen = _watcher(broker)
    with watcher, MqttLink("dev-0", broker.broker_config(account)) as link:
        for i in range(5):
            link.publish(topic, bytes([i]) * 20_000, qos=1, on_acked=times.append)
        # untimed publishes in between are not mistaken for timed ones
        link.publish(topic, b"x", qos=1)
        wait_until(lambda: len(seen) == 6, what="the updates at the watcher")
        wait_until(lambda: len(times) == 5, what="five acknowledgements timed")
    assert all(0 < t < 5.0 for t in times)
    assert link.handler_errors == 0


def test_a_publish_queued_while_offline_is_sent_later_and_not_timed(broker):
    times: list[float] = []
    account = broker.device_account("dev-1")
    topic = f"edgefl/{FLEET}/devices/dev-1/update"
    watcher, seen = _watcher(broker)
    link = MqttLink("dev-1", broker.broker_config(account))
    with watcher:
        # not connected: queued, sent on connect, and its time would say nothing of the link
        link.publish(topic, b"queued", qos=1, on_acked=times.append)
        link.start()
        try:
            wait_until(lambda: seen == [b"queued"], what="the queued update delivered")
            acked = threading.Event()
            link.publish(topic, b"live", qos=1, on_acked=lambda _s: acked.set())
            assert acked.wait(5.0)
        finally:
            link.stop()
    assert times == []


def test_a_failing_callback_is_counted_and_the_link_stays_up(broker):
    account = broker.device_account("dev-2")
    topic = f"edgefl/{FLEET}/devices/dev-2/update"

    def boom(_s: float) -> None:
        raise RuntimeError("callback bug")

    with MqttLink("dev-2", broker.broker_config(account)) as link:
        link.publish(topic, b"a", qos=1, on_acked=boom)
        wait_until(lambda: link.handler_errors == 1, what="the failure counted")
        ok = threading.Event()
        link.publish(topic, b"b", qos=1, on_acked=lambda _s: ok.set())
        assert ok.wait(5.0) and link.connected.is_set()
