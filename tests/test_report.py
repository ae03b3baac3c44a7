"""launch/report.py and the local run's start-up progress: a real small run (the programs of a
deployment over a private Mosquitto, as `edgefl demo` starts them) writes report.html and its
charts, and the closing summary has a row per device."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.properties import Properties

from edgefl.config import RunConfig, load
from launch.local import LocalRun, print_summary, run_local
from launch.report import CHARTS, device_table, render

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.broker, pytest.mark.slow]
DEVICES = ["dev-00", "dev-01", "dev-02"]
PNG = b"\x89PNG\r\n\x1a\n"


def _junk_from(live: LocalRun, device_id: str) -> None:
    """One malformed update from an enrolled device's own account, during round 1; then wait
    (the run ends by itself: returning would stop the aggregator)."""
    account = live.broker.device_account(device_id)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"junk-{device_id}",
                    protocol=paho.MQTTv5)
    c.username_pw_set(account.username, account.password)
    c.connect(live.broker.host, live.broker.port, clean_start=True, properties=Properties(1))
    c.loop_start()
    c.publish(f"edgefl/demo/devices/{device_id}/update", b"\x00junk", qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    time.sleep(600)


def test_a_real_run_writes_a_self_contained_report_with_every_device(tmp_path, capsys) -> None:
    cfg = load(RunConfig, ROOT / "configs" / "b1.toml", {
        "rounds": {"rounds": 2},
        "demo": {"devices": 3, "device_processes": 1, "solo_device": False,
                 "telemetry_interval_s": 2.0},
    })
    result = run_local(cfg, tmp_path / "run", progress=True, timeout_s=300,
                       during=lambda live: _junk_from(live, "dev-01"))
    assert result.ok, result.error
    started = capsys.readouterr().out
    # start-up progress, in order, before the first round's line
    marks = ["broker up on 127.0.0.1:", "starting 3 device agents in 1 processes",
             "devices online 3/3", "round 1 started", "round   1/2"]
    at = [started.find(m) for m in marks]
    assert -1 not in at and at == sorted(at), started

    run = result.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    devices = metrics["devices"]
    assert sorted(devices) == DEVICES
    assert {d: f["rounds"] for d, f in devices.items()} == dict.fromkeys(DEVICES, 2)
    assert {d: f["rejected"] for d, f in devices.items()} == {"dev-00": 0, "dev-01": 1,
                                                              "dev-02": 0}
    assert {d: f["samples"] for d, f in devices.items()} == metrics["samples_per_device"]
    # what the devices say they sent is what the aggregator took (the junk came from another
    # connection, which no agent counts)
    sent = [f["uplink_bytes"] for f in devices.values()]
    assert all(sent) and sum(sent) == sum(r["uplink_bytes"] for r in metrics["rounds"])

    page = (run / "report.html").read_text()
    for section in ["summary", *(stem for stem, _ in CHARTS), "devices", "rounds"]:
        assert f'<section id="{section}">' in page, section
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(CHARTS)
    for stem, _ in CHARTS:
        assert (run / f"{stem}.png").read_bytes().startswith(PNG), stem
    assert all(base64.b64decode(data).startswith(PNG) for data in images)
    # self-contained: nothing to fetch, nothing to run
    assert not re.search(r"https?://|<script|<link|<iframe|url\(", page)
    rows = re.findall(r'<tr class="device"><td>([^<]+)</td><td>(\d+)/2</td><td>(\d+)</td>', page)
    assert rows == [("dev-00", "2", "0"), ("dev-01", "2", "1"), ("dev-02", "2", "0")]

    print_summary(result)
    summary = capsys.readouterr().out
    table = summary[summary.index("per device"):].splitlines()
    for device_id in DEVICES:
        (line,) = [row for row in table if row.split()[:1] == [device_id]]
        f = devices[device_id]
        assert line.split()[1:4] == ["2/2", str(f["rejected"]), str(f["samples"])]
    assert f"{run}/report.html" in summary


def test_the_summary_table_of_a_large_fleet_stops_and_counts_the_rest() -> None:
    devices = {f"d{i:03d}": {"rounds": 1, "rejected": 0, "samples": 5, "uplink_bytes": 2048}
               for i in range(30)}
    lines = device_table(devices, rounds=1, limit=25)
    assert len(lines) == 1 + 25 + 1
    assert lines[-1].startswith("... and 5 more devices")


def test_device_names_are_escaped_in_the_page() -> None:
    page = render({"rounds": [], "devices": {"<b>x</b>": {"rounds": 0, "rejected": 0,
                   "samples": 0, "uplink_bytes": 0}}}, {})
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
