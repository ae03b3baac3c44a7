"""``edgefl status`` (monitor/status.py, launch/cli.py) over the private Mosquitto: a
three-device fleet shown while it trains, a device killed mid-round included, by the function
the command line uses and by the command line itself in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aggregator.enrolled import add_ids
from broker.private import free_port
from edgefl.config import to_dict, to_toml
from monitor import status
from monitor.fleet import FleetView
from tests.conftest import FLEET, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launch", "status", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def test_status_shows_a_training_fleet_and_a_device_killed_mid_round(
    make_fleet, broker, tmp_path
) -> None:
    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i) for i in range(3)]
    victim = agents[2]
    trains = victim._train_and_publish
    # it works in round 1, then dies (no goodbye: its Will fires) on round 2's task
    victim._train_and_publish = lambda task: victim.crash() if task.round >= 2 else trains(task)
    add_ids(tmp_path / "enrolled.txt", ["dev-0", "dev-1", "dev-2", "dev-3"])
    # a long grace for the dead device, so that round 2 stays open while we look
    cfg = fleet.aggregator_config(rounds=3, min_devices=0, deadline_s=60.0, offline_grace_s=60.0,
                                  wait_for_devices_s=2.0)
    cfg.enrolled_devices = str(tmp_path / "enrolled.txt")
    monitor = broker.broker_config(broker.monitor)
    agg = fleet.aggregator(cfg)
    agg.start()
    runner = threading.Thread(target=agg.run, kwargs={"rounds": 3}, daemon=True)
    try:
        # dev-3 is enrolled but never comes: wait_for_devices_s passes first
        runner.start()
        with FleetView(FLEET, monitor) as view:
            def stuck() -> bool:
                snap = view.snapshot()
                a = snap["aggregator"] or {}
                return (a.get("round") == 2 and a.get("reported") == 2
                        and snap["devices"].get("dev-2", {}).get("state") == "offline")
            wait_until(stuck, timeout=40, what="round 2 waiting for the dead device")

        # the function the command line uses
        snap = status.gather(FLEET, monitor, enrolled=["dev-0", "dev-1", "dev-2", "dev-3"])
        screen = status.render(snap)

        # and the command line, in a process of its own, as an operator types it
        secret = tmp_path / "monitor.secret"
        secret.write_text(broker.monitor.password + "\n")
        config = tmp_path / "aggregator.toml"
        config.write_text(to_toml(to_dict(cfg)))
        out = _cli("--config", str(config), "--monitor-secret", str(secret), "--json")
        text = _cli("--config", str(config), "--monitor-secret", str(secret))
    finally:
        # end round 2 now rather than at its 60 s grace: the loop stops after this round, and
        # the dead device counts as gone for good
        agg._stopping.set()
        if agg.registry.get("dev-2") is not None:
            agg.registry.get("dev-2").status_at = 0.0
        agg._wake_round()
        runner.join(10)
        agg.stop()
    a = snap["aggregator"]
    assert a["state"] == "online" and a["mode"] == "sync"
    assert (a["round"], a["rounds"], a["reported"], a["expected"]) == (2, 3, 2, 3)
    assert a["waiting_for"] == "updates" and a["missing"] == ["dev-2"]
    assert a["accuracy"] == agg.history[0].accuracy is not None
    assert a["uplink_bytes"] == agg.history[0].uplink_bytes > 0
    devices = snap["devices"]
    assert [d for d in devices] == ["dev-0", "dev-1", "dev-2", "dev-3"]
    assert [devices[d]["state"] for d in devices] == ["online", "online", "offline", "unknown"]
    for d in ("dev-0", "dev-1"):
        # the agents' retained telemetry, with their own process's figures
        t = devices[d]["telemetry"]
        assert t["samples"] == len(fleet.data[int(d[-1])])
        assert t["agent_rss_mb"] > 10 and t["agent_cpu_percent"] is not None
        assert devices[d]["training"] == {"rounds": 2, "assigned": 2, "rejected": 0}
        assert devices[d]["agent_version"]
    # it took part in round 1 and was given round 2, which it never answered
    assert devices["dev-2"]["training"] == {"rounds": 1, "assigned": 2, "rejected": 0}
    assert devices["dev-2"]["last_seen"] is not None and devices["dev-3"]["last_seen"] is None

    assert "aggregator: online, sync, round 2 of 3, model v1: 2 of 3 reported" in screen
    assert "next: waiting for updates from dev-2 (offline) until" in screen
    rows = {line.split()[0]: line.split() for line in screen.splitlines()
            if line.startswith("dev-")}
    assert list(rows) == ["dev-0", "dev-1", "dev-2", "dev-3"]
    assert rows["dev-0"][:2] == ["dev-0", "online"] and rows["dev-0"][-2:] == ["2/2", "0"]
    assert rows["dev-2"][:2] == ["dev-2", "offline"] and rows["dev-2"][-2:] == ["1/2", "0"]
    assert rows["dev-3"][:4] == ["dev-3", "unknown", "never", "-"]

    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli["aggregator"]["missing"] == ["dev-2"] and cli["aggregator"]["round"] == 2
    assert {d: v["state"] for d, v in cli["devices"].items()} == {
        "dev-0": "online", "dev-1": "online", "dev-2": "offline", "dev-3": "unknown"}
    assert text.returncode == 0 and "waiting for updates from dev-2 (offline)" in text.stdout


def test_status_of_a_finished_run_and_watch(make_fleet, broker) -> None:
    fleet = make_fleet(devices=1)
    fleet.start_agent(0)
    with fleet.aggregator(fleet.aggregator_config(rounds=1)) as agg:
        agg.run()
        agg.finish()
    lines: list[str] = []

    class Out:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    status.watch(FLEET, broker.broker_config(broker.monitor), Out(), every_s=0.1, count=2,
                 clear=True)
    screens = "".join(lines).split(status.CLEAR)[1:]
    assert len(screens) == 2
    assert "aggregator: finished, sync, round 1 of 1, model v1" in screens[0]
    assert "next: training is over" in screens[0]
    assert f"accuracy {agg.history[0].accuracy:.4f}" in screens[0]


@pytest.mark.parametrize("trouble", ["no broker", "wrong password"])
def test_status_says_in_one_line_why_it_cannot_read_the_broker(broker, tmp_path, trouble):
    secret = tmp_path / "monitor.secret"
    secret.write_text("wrong\n" if trouble == "wrong password" else broker.monitor.password)
    port = broker.port if trouble == "wrong password" else free_port("127.0.0.1")
    got = _cli("--fleet", FLEET, "--host", "127.0.0.1", "--port", str(port),
               "--monitor-secret", str(secret), "--timeout", "2")
    assert got.returncode == 1 and got.stdout == ""
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgefl status: ")
    assert ("refused 'monitor'" if trouble == "wrong password" else "no connection") in lines[0]


def test_status_without_a_readable_password_file_says_which(tmp_path) -> None:
    got = _cli("--fleet", FLEET, "--monitor-secret", str(tmp_path / "nope.secret"))
    assert got.returncode == 2
    assert "cannot read the monitor password from" in got.stderr
    assert "Traceback" not in got.stderr


def _snapshot(aggregator: dict | None, **devices: dict) -> dict:
    from dataclasses import asdict

    from edgefl.messages import AggregatorStatus

    agg = None if aggregator is None else asdict(AggregatorStatus(**aggregator)) | {
        "received_at": 100.0}
    base = {"state": "online", "enrolled": None, "serving": None, "serving_variant": None,
            "last_seen": 95.0, "telemetry": None, "training": None}
    return {"fleet": "home", "taken_at": 100.0, "connected": True, "aggregator": agg,
            "devices": {d: base | v for d, v in devices.items()},
            "counts": {"online": 1, "offline": 0, "unknown": 0}, "invalid": {"malformed": 3}}


@pytest.mark.parametrize(
    ("aggregator", "expected"),
    [
        (None, "aggregator: no status on the broker"),
        ({"state": "offline", "ts": 40.0}, "offline: lost without a goodbye (its Last Will), "
                                           "60 s ago"),
        ({"state": "online", "mode": "async", "round": 4, "model_version": 3, "rounds": 10,
          "reported": 2, "expected": 5, "waiting_for": "updates", "missing": ["a", "b"]},
         "aggregator: online, async, model v3, buffer 4 (run makes 10 versions): 2 of 5 updates "
         "in the buffer\n  next: waiting for updates from a, b\n"),
        ({"state": "online", "round": 2, "rounds": 5, "waiting_for": "eligible",
          "missing": ["a"], "missing_more": 70},
         "next: no device can take part; waiting for a and 70 more"),
        ({"state": "online", "round": 2, "rounds": 5, "rejected": {"stale": 2, "round": 1},
          "quarantined": ["x"], "uplink_bytes": 2_500_000},
         "bytes up 2.5 MB, down 0 B; 0 devices online as it sees them\n  updates rejected: "
         "round 1, stale 2; quarantined: x"),
    ],
    ids=["none", "will", "async", "eligible", "rejections"],
)
def test_the_screen_says_what_the_aggregator_does(aggregator, expected) -> None:
    screen = status.render(_snapshot(aggregator, a={}), now=100.0)
    assert expected in screen
    assert "skipped invalid messages: malformed 3" in screen


def test_a_device_row_shows_battery_agent_figures_link_and_model() -> None:
    t = {"battery_percent": 41.6, "charging": True, "agent_cpu_percent": 7.4,
         "agent_rss_mb": 120.2, "link_kbps": 850.0, "samples": 300}
    snap = _snapshot({"state": "online", "round": 1, "rounds": 2},
                     a={"telemetry": t, "serving": 4, "serving_variant": "int8",
                        "training": {"rounds": 3, "assigned": 4, "rejected": 2}})
    row = next(line for line in status.render(snap, now=100.0).splitlines()
               if line.startswith("a "))
    assert row.split() == ["a", "online", "5", "s", "ago", "42%", "charging", "7%", "120", "MB",
                           "850", "kbit/s", "300", "v4", "int8", "3/4", "2"]
