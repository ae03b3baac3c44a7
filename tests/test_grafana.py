"""docs/grafana-dashboard.json: every metric the example dashboard queries is one the
aggregator's endpoint (aggregator/prometheus.py) exports, so a renamed metric cannot leave the
dashboard showing "No data"."""

from __future__ import annotations

import json
import re
from pathlib import Path

from aggregator.metrics import RoundMetrics
from aggregator.prometheus import MetricsExporter
from aggregator.registry import DeviceRegistry
from edgefl.config import MetricsConfig
from edgefl.messages import AggregatorStatus, Status, Telemetry
from tests.test_prometheus import parse

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\bedgefl_[a-z0-9_]+")


def queried() -> set[str]:
    """The edgefl metric names in the dashboard's queries and template variables."""
    text = DASHBOARD.read_text()
    dash = json.loads(text)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in METRIC.findall(expr)}


def exported() -> set[str]:
    """Every sample name the endpoint serves once it has seen a round in each mode and a
    device with a battery: a metric that appears only then still counts."""
    reg = DeviceRegistry()
    reading = Telemetry(cpu_percent=1.0, mem_available_mb=100.0, samples=10, battery_percent=60.0)
    reg.on_status("dev-0", Status("online", telemetry=reading))
    exp = MetricsExporter(
        MetricsConfig(enabled=True), fleet="f", mode="async", model="mlp_digits", registry=reg,
        rejected={"update/malformed": 1}, status=lambda: AggregatorStatus("online"),
    )
    for mode, buffer in (("sync", {}), ("async", {"staleness": {"0": 2, "3": 1}})):
        exp.observe(RoundMetrics(
            round=1, model_version=1, participants=3, reported=3, closed_by="all", applied=True,
            accuracy=0.8, loss=0.5, wall_s=1.0, train_s_max=0.5, coordination_s=0.5,
            uplink_bytes=300, downlink_bytes=600, samples=30, mode=mode, buffer=buffer,
        ))
    return {name for name, _labels in parse(exp.text())}


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    wanted = queried()
    assert len(wanted) >= 15  # the parse found the queries, not nothing
    missing = sorted(wanted - exported())
    assert not missing, f"docs/grafana-dashboard.json queries metrics nobody exports: {missing}"


def test_every_panel_has_a_query_and_a_place() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]  # Grafana's 24 columns
