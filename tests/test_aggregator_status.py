"""The aggregator's retained status (aggregator/service.py) as operators read it: what it waits
for and whom, per-device figures, and a finished run's status that nothing overwrites."""

from __future__ import annotations

import logging
import threading

import pytest

from aggregator.enrolled import add_ids
from monitor.fleet import FleetView
from tests.conftest import FLEET, wait_until


def _view(broker) -> FleetView:
    return FleetView(FLEET, broker.broker_config(broker.monitor))


def test_a_finished_run_stays_finished_with_its_accuracy(make_fleet, broker) -> None:
    fleet = make_fleet(devices=2)
    for i in range(2):
        fleet.start_agent(i)
    with fleet.aggregator(fleet.aggregator_config(rounds=2)) as agg:
        history = agg.run()
        agg.finish()
    # stop() came after finish(): it must not have replaced the retained status
    with _view(broker) as view:
        wait_until(lambda: view.snapshot()["aggregator"] is not None, what="the retained status")
        status = view.snapshot()["aggregator"]
    assert status["state"] == "finished" and status["waiting_for"] == "nothing"
    assert status["accuracy"] == history[-1].accuracy is not None
    assert status["round"] == 2 and status["rounds"] == 2 and status["model_version"] == 2
    assert status["uplink_bytes"] == sum(m.uplink_bytes for m in history) > 0
    assert status["downlink_bytes"] == sum(m.downlink_bytes for m in history) > 0
    energy = sum(m.energy_j for m in history)
    assert energy > 0 and status["energy_j"] == pytest.approx(energy)
    assert status["devices"] == {
        d: {"rounds": 2, "assigned": 2, "rejected": 0} for d in ("dev-0", "dev-1")
    }
    assert status["missing"] == [] and status["online"] == 2


def test_a_stop_without_finishing_keeps_the_last_accuracy(make_fleet, broker) -> None:
    fleet = make_fleet(devices=1)
    fleet.start_agent(0)
    with fleet.aggregator(fleet.aggregator_config(rounds=1)) as agg:
        history = agg.run()
    with _view(broker) as view:
        wait_until(lambda: view.snapshot()["aggregator"] is not None, what="the retained status")
        status = view.snapshot()["aggregator"]
    assert status["state"] == "offline"
    assert status["accuracy"] == history[-1].accuracy is not None


def test_it_waits_for_every_enrolled_device_by_default_and_names_them(
    make_fleet, broker, tmp_path, caplog
) -> None:
    fleet = make_fleet(devices=3)
    add_ids(tmp_path / "enrolled.txt", ["dev-0", "dev-1", "dev-2"])
    cfg = fleet.aggregator_config(rounds=1, min_devices=0, wait_for_devices_s=30.0)
    cfg.enrolled_devices = str(tmp_path / "enrolled.txt")
    fleet.start_agent(0)
    caplog.set_level(logging.INFO, logger="aggregator.service")
    with fleet.aggregator(cfg) as agg, _view(broker) as view:
        assert agg.devices_wanted() == 3
        runner = threading.Thread(target=agg.run, daemon=True)
        runner.start()

        def waiting() -> dict | None:
            return view.snapshot()["aggregator"]

        wait_until(lambda: (waiting() or {}).get("waiting_for") == "devices"
                   and waiting()["online"] == 1, what="the status while it waits")
        assert waiting()["missing"] == ["dev-1", "dev-2"]
        assert "fleet 'test': 1 of 3 devices online" in caplog.text
        assert "dev-1, dev-2" in caplog.text
        assert not agg.history  # no round ran on the one device that came first
        fleet.start_agent(1)
        fleet.start_agent(2)
        runner.join(30)
        assert not runner.is_alive()
    assert agg.history[0].participants == 3 and agg.history[0].reported == 3


def test_no_eligible_device_names_the_fleet_and_the_devices(
    make_fleet, broker, tmp_path, caplog
) -> None:
    fleet = make_fleet(devices=1)
    add_ids(tmp_path / "enrolled.txt", ["dev-0", "dev-9"])
    cfg = fleet.aggregator_config(rounds=1, min_devices=0, wait_for_devices_s=0.2)
    cfg.enrolled_devices = str(tmp_path / "enrolled.txt")
    with fleet.aggregator(cfg) as agg, _view(broker) as view:
        assert agg.run_round() is None  # no device: nothing to plan
        wait_until(lambda: (view.snapshot()["aggregator"] or {}).get("waiting_for")
                   == "eligible", what="the status")
        status = view.snapshot()["aggregator"]
    assert status["missing"] == ["dev-0", "dev-9"]
    assert ("round 1: no eligible device in fleet 'test'; waiting (offline: dev-0, dev-9)"
            in caplog.text)


def test_in_async_mode_the_status_says_so_and_names_the_devices_training(
    make_fleet, broker
) -> None:
    fleet = make_fleet(devices=2)
    for i in range(2):
        fleet.start_agent(i)
    cfg = fleet.aggregator_config(mode="async", rounds=2, buffer_size=2, concurrency=2)
    seen: list[dict] = []
    with _view(broker) as view:
        view.add_listener(lambda: seen.append(view.snapshot()["aggregator"]))
        with fleet.aggregator(cfg) as agg:
            history = agg.run()
            agg.finish()
        wait_until(lambda: (seen[-1] or {}).get("state") == "finished", what="finished")
    training = [s for s in seen if s and s["waiting_for"] == "updates"]
    assert training and all(s["mode"] == "async" and s["deadline"] is None for s in training)
    assert any(s["missing"] for s in training)  # the devices with a task out
    assert set().union(*(s["missing"] for s in training)) <= {"dev-0", "dev-1"}
    final = seen[-1]
    assert final["rounds"] == 2 and final["model_version"] == len(history) == 2
    assert sum(f["rounds"] for f in final["devices"].values()) == 4  # two buffers of two
