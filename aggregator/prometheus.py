"""The aggregator's Prometheus endpoint: ``[metrics]``, off by default (README, "Metrics").

Named for what it speaks, as aggregator/metrics.py is named for what a round reports: that
module computes a round's figures (:class:`RoundMetrics`), this one exposes them, and the live
state of the fleet, in Prometheus' text format over HTTP (``prometheus-client``).

Two sources, read two ways:

- **closed rounds** (in asynchronous mode: buffers applied) are fed in one place,
  :meth:`MetricsExporter.observe`, which the service calls where it announces a round; the
  exporter keeps running totals (rounds, updates accepted, bytes, energy, staleness), so a scrape
  costs the same after a million rounds as after one;
- **the live state** is read when Prometheus scrapes, from the objects that already hold it: the
  device registry (online, battery, last seen), the guard's rejection counters, the open round's
  progress. Nothing is copied on every message, and nothing can drift from what the service
  itself acts on.

Per-device series (battery, online, last seen, updates accepted) exist for at most
``max_device_series`` devices, the first by id, so that a fleet of thousands does not become
thousands of series per metric; the others are counted in ``edgefl_devices_unlabelled``.

The exporter has a registry of its own, not prometheus-client's global one, so that several
aggregators in one process (the tests) each serve their own figures.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from aggregator.metrics import RoundMetrics
from aggregator.registry import DeviceRegistry
from edgefl.config import ConfigError, MetricsConfig

if TYPE_CHECKING:
    from edgefl.messages import AggregatorStatus

log = logging.getLogger(__name__)

PREFIX = "edgefl"
# Upper bounds of the staleness histogram (model versions): staleness is a small integer,
# capped by rounds.max_staleness (20 by default); +Inf catches a larger configured cap.
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21)


class MetricsExporter:
    """Serves ``/metrics`` on ``cfg.host:cfg.port`` between :meth:`start` and :meth:`stop`.

    ``status`` gives the aggregator's status as it would publish it now (round, model version,
    reported of expected, quarantined devices); ``history`` the rounds closed before a restart,
    so that the totals go on from where the checkpoint left them."""

    def __init__(
        self,
        cfg: MetricsConfig,
        *,
        fleet: str,
        mode: str,
        model: str,
        registry: DeviceRegistry,
        rejected: dict[str, int],
        status: Callable[[], AggregatorStatus],
        history: Iterable[RoundMetrics] = (),
    ) -> None:
        """``rejected``: the guard's counts of refused messages, keyed ``"kind/reason"``
        (aggregator/guard.py); read, never written, here."""
        self.cfg = cfg
        self._labels = {"fleet": fleet, "mode": mode, "model": model}
        self._devices = registry
        self._rejected = rejected
        self._status = status
        self._lock = threading.Lock()
        self._rounds = 0
        self._applied = 0
        self._accepted = 0
        self._uplink = 0
        self._downlink = 0
        self._samples = 0
        self._energy = 0.0
        self._staleness: dict[int, int] = {}
        self._last: RoundMetrics | None = None
        for m in history:
            self.observe(m)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a collector: prometheus-client calls collect()
        self._server = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> MetricsExporter:
        try:
            self._server, self._thread = start_http_server(
                self.cfg.port, addr=self.cfg.host, registry=self.registry
            )
        except OSError as e:
            # a configuration error: what fixes it is in [metrics] (the command line prints
            # it as one line)
            raise ConfigError(
                f"cannot serve metrics on {self.cfg.host}:{self.cfg.port}: {e.strerror or e}; "
                "another program holds the port, or the address is not this machine's: set "
                "[metrics] port (or host), or enabled = false"
            ) from None
        log.info("metrics for Prometheus on http://%s:%d/metrics", self.cfg.host, self.port)
        return self

    @property
    def port(self) -> int:
        """The port it listens on (the configured one)."""
        return self._server.server_port if self._server is not None else self.cfg.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def text(self) -> str:
        """What a scrape returns, without HTTP (for tests and the command line)."""
        return generate_latest(self.registry).decode()

    # -- what the service feeds -------------------------------------------------------------

    def observe(self, m: RoundMetrics) -> None:
        """A round closed (or a buffer was applied): add it to the totals."""
        with self._lock:
            self._rounds += 1
            self._applied += int(m.applied)
            self._accepted += m.reported
            self._uplink += m.uplink_bytes
            self._downlink += m.downlink_bytes
            self._samples += m.samples
            self._energy += m.energy_j
            for s, n in (m.buffer.get("staleness") or {}).items():
                self._staleness[int(s)] = self._staleness.get(int(s), 0) + int(n)
            # the object itself: the service fills in its wall time after announcing it
            self._last = m

    # -- what a scrape reads ----------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        p = PREFIX
        info = GaugeMetricFamily(
            f"{p}_aggregator_info", "The aggregator's fleet, mode and model (always 1)",
            labels=list(self._labels),
        )
        info.add_metric(list(self._labels.values()), 1.0)
        yield info
        with self._lock:
            totals = {
                "rounds_completed": (self._rounds, "Rounds closed (asynchronous mode: buffers "
                                     "applied), counting rounds without a quorum"),
                "rounds_applied": (self._applied, "Rounds (buffers) whose updates changed the "
                                   "model"),
                "updates_accepted": (self._accepted, "Updates folded into a closed round or an "
                                     "applied buffer"),
                "uplink_bytes": (self._uplink, "Bytes of the updates accepted"),
                "downlink_bytes": (self._downlink, "Bytes of tasks and models sent to devices"),
                "samples": (self._samples, "Training samples behind the updates accepted"),
                "energy_joules": (self._energy, "Energy the devices' work is estimated to have "
                                  "used"),
            }
            staleness = sorted(self._staleness.items())
            last = self._last
        for name, (value, doc) in totals.items():
            yield CounterMetricFamily(f"{p}_{name}", doc, value=value)
        if staleness:
            yield _histogram(
                f"{p}_update_staleness",
                "Staleness of the updates in applied buffers (asynchronous mode), in versions",
                staleness,
            )
        if last is not None:
            yield from _last_round(last)
        yield from self._live()

    def _live(self) -> Iterator[Metric]:
        p = PREFIX
        st = self._status()
        for name, value, doc in (
            ("round", st.round, "The round open now, else the last one closed (asynchronous "
             "mode: the buffer being filled)"),
            ("round_reported", st.reported, "Updates the open round (buffer) holds"),
            ("round_expected", st.expected, "Updates the open round (buffer) waits for"),
            ("model_version", st.model_version, "Version of the global model"),
            ("devices_quarantined", len(st.quarantined), "Devices cut off at the broker"),
        ):
            yield GaugeMetricFamily(f"{p}_{name}", doc, value=value)
        rejected = CounterMetricFamily(
            f"{p}_rejected", "Messages refused, by kind (update, status, telemetry, reply) and "
            "reason", labels=["kind", "reason"],
        )
        for key, n in sorted(dict(self._rejected).items()):
            kind, _, reason = key.partition("/")
            rejected.add_metric([kind, reason], n)
        yield rejected
        records = self._devices.records()
        online = sum(r.online for r in records)
        yield GaugeMetricFamily(f"{p}_devices_online", "Devices online", value=online)
        yield GaugeMetricFamily(f"{p}_devices_known", "Devices heard of", value=len(records))
        cap = self.cfg.max_device_series
        yield GaugeMetricFamily(
            f"{p}_devices_unlabelled",
            "Devices beyond metrics.max_device_series, which have no per-device series",
            value=max(0, len(records) - cap),
        )
        yield from _per_device(records[:cap])


def _last_round(m: RoundMetrics) -> Iterator[Metric]:
    p = PREFIX
    if m.accuracy is not None:
        yield GaugeMetricFamily(f"{p}_accuracy", "Test accuracy of the global model after the "
                                "last round (held-out eval_data)", value=m.accuracy)
    if m.loss is not None:
        yield GaugeMetricFamily(f"{p}_loss", "Test loss of the global model after the last "
                                "round", value=m.loss)
    yield GaugeMetricFamily(f"{p}_last_round", "Number of the last round closed (buffer "
                            "applied)", value=m.round)
    yield GaugeMetricFamily(f"{p}_last_round_reported", "Updates the last round took",
                            value=m.reported)
    yield GaugeMetricFamily(f"{p}_last_round_participants", "Devices the last round asked",
                            value=m.participants)
    yield GaugeMetricFamily(f"{p}_last_round_seconds", "Wall time of the last round",
                            value=m.wall_s)


def _per_device(records: list) -> Iterator[Metric]:
    p = PREFIX
    online = GaugeMetricFamily(f"{p}_device_online", "1 if the device is online", labels=["device"])
    seen = GaugeMetricFamily(
        f"{p}_device_last_seen_timestamp_seconds",
        "When the device's last telemetry or status arrived (Unix time)", labels=["device"],
    )
    battery = GaugeMetricFamily(f"{p}_device_battery_percent", "The device's latest battery "
                                "level (devices on mains have none)", labels=["device"])
    accepted = CounterMetricFamily(f"{p}_device_updates_accepted", "The device's updates "
                                   "accepted", labels=["device"])
    rejected = CounterMetricFamily(f"{p}_device_updates_rejected", "The device's updates (and "
                                   "replies) refused", labels=["device"])
    for r in records:
        online.add_metric([r.device_id], float(r.online))
        last = max(r.telemetry_at, r.status_at)
        if last:
            seen.add_metric([r.device_id], last)
        if r.battery_pct is not None:
            battery.add_metric([r.device_id], r.battery_pct)
        accepted.add_metric([r.device_id], r.rounds_completed)
        rejected.add_metric([r.device_id], r.updates_rejected)
    yield from (online, seen, battery, accepted, rejected)


def _histogram(name: str, doc: str, counts: list[tuple[int, int]]) -> HistogramMetricFamily:
    """A cumulative histogram over ``STALENESS_BUCKETS`` from (value, count) pairs."""
    buckets = []
    for bound in STALENESS_BUCKETS:
        buckets.append((floatToGoString(bound), sum(n for v, n in counts if v <= bound)))
    buckets.append(("+Inf", sum(n for _, n in counts)))
    total = sum(v * n for v, n in counts)
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)
