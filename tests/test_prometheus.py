"""aggregator/prometheus.py: the aggregator's Prometheus endpoint, scraped over HTTP during and
after real runs over the private Mosquitto, and off unless configured."""

from __future__ import annotations

import socket
import urllib.request

import paho.mqtt.client as paho
import psutil
import pytest
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import RoundMetrics
from aggregator.prometheus import MetricsExporter
from aggregator.registry import DeviceRegistry
from edgefl.config import AggregatorConfig, ConfigError, MetricsConfig, ProfileConfig, from_dict
from edgefl.messages import AggregatorStatus, Status, Telemetry
from tests.conftest import FLEET, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint serves: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    return parse(text)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def metrics_on(cfg: AggregatorConfig, **over) -> int:
    port = free_port()
    cfg.metrics = MetricsConfig(enabled=True, port=port, **over)
    return port


def _junk_update(broker, device_id: str) -> None:
    """An enrolled device's connection publishing an update that is not an envelope at all."""
    account = broker.device_account(device_id)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"junk-{device_id}",
                    protocol=paho.MQTTv5)
    c.username_pw_set(account.username, account.password)
    c.connect(broker.host, broker.port, clean_start=True, properties=Properties(1))
    c.loop_start()
    try:
        topic = f"edgefl/{FLEET}/devices/{device_id}/update"
        c.publish(topic, b"\x00not an update", qos=1).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


@pytest.mark.broker
def test_a_scrape_shows_what_the_run_did(make_fleet) -> None:
    fleet = make_fleet(devices=2)
    # dev-0 runs on a simulated battery, dev-1 on mains
    fleet.start_agent(0, profile=ProfileConfig(simulated=True, battery_pct=80.0))
    fleet.start_agent(1)
    cfg = fleet.aggregator_config(rounds=3)
    # one device labelled, the other only counted
    port = metrics_on(cfg, max_device_series=1)
    during: list[dict] = []
    with fleet.aggregator(cfg) as agg:
        agg.on_round = lambda m: during.append(scrape(port)) if m.round == 1 else None
        wait_until(lambda: agg.registry.is_online("dev-0"), what="dev-0's birth")
        _junk_update(fleet.broker, "dev-0")
        wait_until(lambda: agg.guard.rejected["update/malformed"] >= 1, what="the rejection")
        history = agg.run()
        after = scrape(port)
    assert len(history) == 3
    # during round 1's announcement: one round counted, with its own updates
    (first,) = during
    assert value(first, "edgefl_rounds_completed_total") == 1
    assert value(first, "edgefl_updates_accepted_total") == history[0].reported
    # after the run: the totals are the run's
    assert value(after, "edgefl_rounds_completed_total") == 3
    assert value(after, "edgefl_rounds_applied_total") == 3
    assert value(after, "edgefl_updates_accepted_total") == sum(m.reported for m in history) == 6
    assert value(after, "edgefl_uplink_bytes_total") == sum(m.uplink_bytes for m in history)
    assert value(after, "edgefl_downlink_bytes_total") == sum(m.downlink_bytes for m in history)
    assert value(after, "edgefl_model_version") == agg.version == 3
    assert value(after, "edgefl_round") == 3
    assert value(after, "edgefl_accuracy") == pytest.approx(history[-1].accuracy)
    assert value(after, "edgefl_loss") == pytest.approx(history[-1].loss)
    assert value(after, "edgefl_rejected_total", kind="update", reason="malformed") == 1
    assert value(after, "edgefl_devices_online") == 2
    # the cap: dev-0 has its series, dev-1 is counted only
    assert value(after, "edgefl_devices_unlabelled") == 1
    assert value(after, "edgefl_device_online", device="dev-0") == 1
    assert value(after, "edgefl_device_online", device="dev-1") is None
    battery = value(after, "edgefl_device_battery_percent", device="dev-0")
    assert battery is not None and 50.0 < battery <= 80.0
    assert value(after, "edgefl_device_updates_accepted_total", device="dev-0") == 3
    assert value(after, "edgefl_device_updates_rejected_total", device="dev-0") == 1
    seen = value(after, "edgefl_device_last_seen_timestamp_seconds", device="dev-0")
    assert seen is not None and seen > 0
    assert value(after, "edgefl_aggregator_info", fleet=FLEET, mode="sync",
                 model="mlp_digits") == 1
    # stopped with the aggregator
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.broker
def test_async_staleness_is_a_histogram_of_every_update_applied(make_fleet) -> None:
    fleet = make_fleet(devices=3)
    for i in range(3):
        fleet.start_agent(i)
    cfg = fleet.aggregator_config(mode="async", rounds=3, buffer_size=2, concurrency=3)
    port = metrics_on(cfg)
    with fleet.aggregator(cfg) as agg:
        history = agg.run()
        after = scrape(port)
    staleness = [(int(s), n) for m in history for s, n in m.buffer["staleness"].items()]
    assert value(after, "edgefl_update_staleness_count") == 6
    assert value(after, "edgefl_update_staleness_sum") == sum(s * n for s, n in staleness)
    assert value(after, "edgefl_update_staleness_bucket", le="0.0") == sum(
        n for s, n in staleness if s == 0
    )
    assert value(after, "edgefl_rounds_completed_total") == 3
    assert value(after, "edgefl_aggregator_info", fleet=FLEET, mode="async",
                 model="mlp_digits") == 1


@pytest.mark.broker
def test_metrics_are_off_by_default(make_fleet) -> None:
    fleet = make_fleet(devices=1)
    fleet.start_agent(0)
    cfg = fleet.aggregator_config(rounds=1)
    assert not cfg.metrics.enabled
    before = _listening()
    with fleet.aggregator(cfg) as agg:
        agg.run()
        assert agg.exporter is None
        # the aggregator opened no port of its own (other tests' servers may be listening)
        assert _listening() == before


def _listening() -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def test_two_exporters_in_one_process_keep_their_own_figures() -> None:
    def exporter(fleet: str) -> MetricsExporter:
        return MetricsExporter(
            MetricsConfig(enabled=True), fleet=fleet, mode="sync", model="mlp_digits",
            registry=DeviceRegistry(), rejected={}, status=lambda: AggregatorStatus("online"),
        )

    a, b = exporter("a"), exporter("b")
    a.observe(_round(1, reported=4))
    assert value(parse(a.text()), "edgefl_updates_accepted_total") == 4
    assert value(parse(b.text()), "edgefl_updates_accepted_total") == 0


def test_a_port_in_use_is_a_clear_configuration_error() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        exp = MetricsExporter(
            MetricsConfig(enabled=True, port=port), fleet="f", mode="sync", model="mlp_digits",
            registry=DeviceRegistry(), rejected={}, status=lambda: AggregatorStatus("online"),
        )
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{port}: .*set \[metrics\] port"):
            exp.start()


def test_totals_go_on_from_the_rounds_before_a_restart() -> None:
    exp = MetricsExporter(
        MetricsConfig(enabled=True), fleet="f", mode="sync", model="mlp_digits",
        registry=DeviceRegistry(), rejected={}, status=lambda: AggregatorStatus("online"),
        history=[_round(1, reported=4), _round(2, reported=3)],
    )
    exp.observe(_round(3, reported=2))
    got = parse(exp.text())
    assert value(got, "edgefl_rounds_completed_total") == 3
    assert value(got, "edgefl_updates_accepted_total") == 9
    assert value(got, "edgefl_uplink_bytes_total") == 900
    assert value(got, "edgefl_last_round") == 3


def test_the_device_cap_labels_the_first_devices_by_id_and_counts_the_rest() -> None:
    reg = DeviceRegistry()
    for d in ("d3", "d1", "d2", "d4"):
        reg.on_status(d, Status("online", telemetry=Telemetry(
            cpu_percent=1.0, mem_available_mb=100.0, samples=10, battery_percent=50.0)))
    rejected = {"update/stale": 2, "telemetry/malformed": 1}
    exp = MetricsExporter(
        MetricsConfig(enabled=True, max_device_series=2), fleet="f", mode="sync",
        model="mlp_digits", registry=reg, rejected=rejected,
        status=lambda: AggregatorStatus("online", round=7, reported=1, expected=3),
    )
    got = parse(exp.text())
    labelled = {dict(labels)["device"] for (name, labels) in got
                if name == "edgefl_device_battery_percent"}
    assert labelled == {"d1", "d2"}
    assert value(got, "edgefl_devices_unlabelled") == 2
    assert value(got, "edgefl_devices_online") == 4
    assert value(got, "edgefl_rejected_total", kind="update", reason="stale") == 2
    assert value(got, "edgefl_rejected_total", kind="telemetry", reason="malformed") == 1
    assert value(got, "edgefl_round") == 7 and value(got, "edgefl_round_expected") == 3
    # no round closed yet: no accuracy to show rather than a made-up one
    assert value(got, "edgefl_accuracy") is None


def _round(number: int, reported: int) -> RoundMetrics:
    return RoundMetrics(
        round=number, model_version=number, participants=reported, reported=reported,
        closed_by="all", applied=True, accuracy=0.5, loss=1.0, wall_s=1.0, train_s_max=0.5,
        coordination_s=0.5, uplink_bytes=100 * reported, downlink_bytes=200, samples=10,
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"port": 0}, "metrics.port 0 is not a TCP port"),
        ({"port": 70000}, "metrics.port 70000 is not a TCP port"),
        ({"max_device_series": -1}, "metrics.max_device_series must be >= 0"),
        ({"host": " "}, "metrics.host must name an address"),
        ({"enable": True}, "unknown key 'enable' in [metrics]"),
    ],
)
def test_a_bad_metrics_table_is_refused_with_what_to_fix(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(AggregatorConfig, {"metrics": table})


def test_the_defaults_serve_nothing_and_only_this_machine() -> None:
    m = from_dict(AggregatorConfig, {}).metrics
    assert (m.enabled, m.host) == (False, "127.0.0.1")
