"""The aggregator's picture of the fleet, built from births, Last Wills, telemetry and updates.

Per device it keeps:
- whether it is online: a birth makes it so; its Last Will (or goodbye) makes it offline, and so
  does silence: no telemetry (nor birth) for ``telemetry_max_age_s`` (see :meth:`sweep`). A
  silent device comes back with its next telemetry; one whose Will fired needs a new birth;
- the last telemetry, and the freshest battery reading (telemetry, or the figures an update or
  reply carries);
- its power model and, for a device that knows it, its net charging power (from the birth),
  measured throughput (samples/s of local training, from past updates and replies), and the
  latency around its work (task to update, minus training and upload);
- reliability: the share of assigned rounds it did not miss the deadline of (declines are not
  held against it), and the energy its work is estimated to have used.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgefl.compression import WireError
from edgefl.config import ProfileConfig
from edgefl.messages import PowerModel, Status, Telemetry

log = logging.getLogger(__name__)

_DEFAULTS = ProfileConfig()
# what a device that does not say is assumed to draw (the defaults of a [profile] table)
DEFAULT_POWER = PowerModel(_DEFAULTS.compute_w, _DEFAULTS.radio_w, _DEFAULTS.battery_wh)


@dataclass
class DeviceRecord:
    device_id: str
    online: bool = False
    offline_reason: str = ""  # "will" (Last Will or goodbye) | "silent" | "quarantined"
    status_at: float = 0.0
    # when its latest birth found it offline: an agent that restarted (or reconnected after a
    # Will) holds no task it was given before (asynchronous mode gives it a new one)
    online_since: float = 0.0
    capabilities: dict[str, Any] = field(default_factory=dict)
    agent_version: str = ""
    telemetry: Telemetry | None = None
    telemetry_at: float = 0.0  # our clock, not the device's: device clocks drift
    power: PowerModel | None = None  # from the birth; None: not reported
    # net power into its battery while charging (birth); None: not known, as for a real device
    # on its charger, which then counts as not draining
    charge_w: float | None = None
    battery_pct: float | None = None  # freshest reading from telemetry, updates or replies
    charging: bool | None = None
    battery_at: float = 0.0
    rounds_assigned: int = 0
    rounds_completed: int = 0
    deadlines_missed: int = 0
    declines: int = 0
    updates_rejected: int = 0  # its updates (and replies) refused on arrival, for operators
    last_decline: str = ""
    # samples per second of local training, smoothed over past updates
    throughput_sps: float | None = None
    # seconds from task to update beyond training and upload (delivery, queueing), smoothed
    latency_s: float | None = None
    energy_j: float = 0.0  # estimated, over all its work
    serving: int | None = None  # ONNX model version the device serves
    serving_accuracy: float | None = None
    serving_seq: int | None = None  # the deployment it came with
    previous_accuracy: float | None = None

    @property
    def reliability(self) -> float:
        """Share of assigned rounds the device did not miss the deadline of (1.0 before any)."""
        if self.rounds_assigned <= 0:
            return 1.0
        return max(0.0, 1.0 - self.deadlines_missed / self.rounds_assigned)

    @property
    def samples(self) -> int | None:
        """Local samples, from telemetry or the birth's capabilities."""
        if self.telemetry is not None:
            return self.telemetry.samples
        n = self.capabilities.get("samples")
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None

    @property
    def link_kbps(self) -> float | None:
        return self.telemetry.link_kbps if self.telemetry is not None else None

    @property
    def mem_available_mb(self) -> float | None:
        return self.telemetry.mem_available_mb if self.telemetry is not None else None

    def upload_s(self, nbytes: int) -> float:
        """Seconds the device's link needs for ``nbytes`` (0 if it reports no bandwidth)."""
        kbps = self.link_kbps
        return nbytes * 8 / (kbps * 1000.0) if kbps else 0.0

    def energy_j_for(self, cpu_s: float, upload_s: float) -> float:
        """Energy estimate from CPU time and the device's power model."""
        p = self.power or DEFAULT_POWER
        return cpu_s * p.compute_w + upload_s * p.radio_w

    def on_battery(self) -> bool:
        """Runs on a battery that is not charging (the battery floor applies)."""
        return self.battery_pct is not None and not self.charging

    def net_draw_w(self) -> tuple[float, float] | None:
        """Watts that (training, uploading) take out of its battery, net of charging, or None
        if its work does not drain it: on mains, or charging with power to spare or at an
        unknown power (a real device only knows it is plugged in)."""
        if self.battery_pct is None:
            return None
        p = self.power or DEFAULT_POWER
        if not self.charging:
            return p.compute_w, p.radio_w
        if self.charge_w is None:
            return None
        draw = max(0.0, p.compute_w - self.charge_w), max(0.0, p.radio_w - self.charge_w)
        return draw if any(draw) else None


def _charge_w(device_id: str, capabilities: dict[str, Any]) -> float | None:
    value = capabilities.get("charge_w")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.0 <= value <= 10_000.0
    ):
        log.warning("%s: ignored its charging power %r", device_id, value)
        return None
    return float(value)


class DeviceRegistry:
    """Thread-safe: the network thread writes, the round loop reads."""

    def __init__(self, smoothing: float = 0.5) -> None:
        self._devices: dict[str, DeviceRecord] = {}
        # re-entrant: wait_for() predicates may call back into the registry
        self._lock = threading.RLock()
        self._smoothing = smoothing
        self.changed = threading.Condition(self._lock)

    def _get(self, device_id: str) -> DeviceRecord:
        rec = self._devices.get(device_id)
        if rec is None:
            rec = self._devices[device_id] = DeviceRecord(device_id)
        return rec

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self._smoothing * new + (1 - self._smoothing) * old

    def _battery(self, rec: DeviceRecord, pct: float | None, charging: bool | None) -> None:
        rec.battery_pct, rec.charging, rec.battery_at = pct, charging, time.time()

    # -- what devices say -------------------------------------------------------------------------

    def on_status(self, device_id: str, status: Status) -> None:
        with self._lock:
            rec = self._get(device_id)
            was_online = rec.online
            rec.online = status.state == "online"
            rec.offline_reason = "" if rec.online else "will"
            rec.status_at = time.time()
            if rec.online and not was_online:
                rec.online_since = rec.status_at
            if rec.online:
                rec.capabilities = dict(status.capabilities)
                rec.agent_version = status.agent_version
                rec.serving = status.serving
                rec.serving_accuracy = status.serving_accuracy
                rec.serving_seq = status.serving_seq
                rec.previous_accuracy = status.previous_accuracy
                try:
                    rec.power = PowerModel.from_capabilities(status.capabilities)
                except WireError as e:
                    log.warning("%s: ignored its power model: %s", device_id, e)
                    rec.power = None
                rec.charge_w = _charge_w(device_id, status.capabilities)
                if status.telemetry is not None:
                    # the birth's reading lets a device be scheduled before its first report
                    self._telemetry(rec, status.telemetry)
            self.changed.notify_all()

    def _telemetry(self, rec: DeviceRecord, telemetry: Telemetry) -> None:
        rec.telemetry = telemetry
        rec.telemetry_at = time.time()
        self._battery(rec, telemetry.battery_percent, telemetry.charging)

    def on_telemetry(self, device_id: str, telemetry: Telemetry) -> None:
        with self._lock:
            rec = self._get(device_id)
            self._telemetry(rec, telemetry)
            if not rec.online and rec.offline_reason in ("silent", "quarantined"):
                # it was only quiet, or an operator let it back in at the broker (its birth may
                # have come while the guard still dropped its messages); a device whose Will
                # fired comes back with a birth
                rec.online, rec.offline_reason = True, ""
                log.info("device %s speaks again", device_id)
            self.changed.notify_all()

    def on_quarantined(self, device_id: str) -> None:
        """Cut off at the broker: offline until it is re-admitted and sends a new birth."""
        with self._lock:
            rec = self._get(device_id)
            rec.online, rec.offline_reason = False, "quarantined"
            rec.status_at = time.time()
            self.changed.notify_all()

    def sweep(self, max_age_s: float) -> list[str]:
        """Mark devices offline ("silent") whose last telemetry is older than ``max_age_s``."""
        now = time.time()
        gone = []
        with self._lock:
            for rec in self._devices.values():
                if rec.online and now - rec.telemetry_at > max_age_s:
                    rec.online, rec.offline_reason = False, "silent"
                    gone.append(rec.device_id)
            if gone:
                self.changed.notify_all()
        for device_id in gone:
            log.info("device %s is silent (no telemetry for %.0f s): offline", device_id, max_age_s)
        return gone

    # -- rounds -----------------------------------------------------------------------------------

    def on_assigned(self, device_ids: list[str]) -> None:
        with self._lock:
            for d in device_ids:
                self._get(d).rounds_assigned += 1

    def on_work(
        self,
        device_id: str,
        metrics: dict[str, float],
        *,
        payload_bytes: int = 0,
        turnaround_s: float | None = None,
        completed: bool = True,
    ) -> float:
        """Account for work a device reports (an update, or a reply with what it spent);
        returns the energy estimate for it, in joules."""
        with self._lock:
            rec = self._get(device_id)
            if completed:
                rec.rounds_completed += 1
            train_s = metrics.get("train_s", 0.0)
            seen = metrics.get("samples_seen", 0.0)
            if train_s > 0 and seen > 0:
                rec.throughput_sps = self._smooth(rec.throughput_sps, seen / train_s)
            upload_s = rec.upload_s(payload_bytes)
            if turnaround_s is not None and train_s > 0:
                latency = max(0.0, turnaround_s - train_s - upload_s)
                rec.latency_s = self._smooth(rec.latency_s, latency)
            if "battery_pct" in metrics:
                self._battery(rec, metrics["battery_pct"], metrics.get("charging", 0.0) > 0)
            energy = rec.energy_j_for(max(0.0, metrics.get("cpu_s", 0.0)), upload_s)
            rec.energy_j += energy
            return energy

    def on_declined(self, device_id: str, reason: str) -> None:
        """A device refused a task: a matter of policy (its battery), not of reliability."""
        with self._lock:
            rec = self._get(device_id)
            rec.declines += 1
            rec.last_decline = reason
            rec.rounds_assigned = max(0, rec.rounds_assigned - 1)

    def on_rejected(self, device_id: str) -> None:
        """One of its updates or replies was refused (counted for operators; the guard decides
        whether that is the device's fault)."""
        with self._lock:
            rec = self._devices.get(device_id)
            if rec is not None:  # a device never heard of is not made known by its garbage
                rec.updates_rejected += 1

    def figures(self, limit: int) -> tuple[dict[str, dict[str, int]], int]:
        """Per device (the first ``limit`` by id): rounds contributed to, rounds assigned,
        updates rejected; and how many devices were left out by the limit."""
        with self._lock:
            recs = sorted(self._devices.values(), key=lambda r: r.device_id)
            shown = {
                r.device_id: {
                    "rounds": r.rounds_completed,
                    "assigned": r.rounds_assigned,
                    "rejected": r.updates_rejected,
                }
                for r in recs[:limit]
            }
        return shown, max(0, len(recs) - limit)

    def on_missed(self, device_ids: list[str]) -> None:
        with self._lock:
            for d in device_ids:
                self._get(d).deadlines_missed += 1

    # -- queries --------------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            return self._devices.get(device_id)

    def online(self, telemetry_max_age_s: float | None = None) -> list[DeviceRecord]:
        """Online devices, optionally only those whose telemetry is recent, sorted by id."""
        now = time.time()
        with self._lock:
            out = [
                r
                for r in self._devices.values()
                if r.online
                and (telemetry_max_age_s is None or now - r.telemetry_at <= telemetry_max_age_s)
            ]
        return sorted(out, key=lambda r: r.device_id)

    def records(self) -> list[DeviceRecord]:
        """Every device known, online or not, sorted by id."""
        with self._lock:
            return sorted(self._devices.values(), key=lambda r: r.device_id)

    def is_online(self, device_id: str) -> bool:
        with self._lock:
            rec = self._devices.get(device_id)
            return bool(rec and rec.online)

    def may_return(self, device_id: str, grace_s: float) -> bool:
        """Online, or offline for less than ``grace_s``: a Will can be a passing blip (a broker
        restart sends every client's), and a device back within the grace still delivers."""
        with self._lock:
            rec = self._devices.get(device_id)
            if rec is None:
                return False
            return rec.online or time.time() - rec.status_at < grace_s

    def wait_online(self, count: int, timeout: float) -> int:
        """Block until ``count`` devices are online or ``timeout`` passes; returns how many are."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                n = sum(r.online for r in self._devices.values())
                left = deadline - time.monotonic()
                if n >= count or left <= 0:
                    return n
                self.changed.wait(min(left, 0.5))

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(records)`` holds (checked on every status change)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if predicate(list(self._devices.values())):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.5))

    # what a checkpoint keeps of each device: its history, not its passing state
    _KEPT = ("device_id", "capabilities", "agent_version", "rounds_assigned", "rounds_completed",
             "deadlines_missed", "declines", "throughput_sps", "latency_s", "energy_j",
             "updates_rejected")

    def snapshot(self) -> list[dict[str, Any]]:
        """Plain data for checkpoints: what :meth:`restore` brings back. Built field by field
        (not ``dataclasses.asdict``, which deep-copies): it runs at every round's close."""
        with self._lock:
            return [{k: getattr(r, k) for k in self._KEPT} for r in self._devices.values()]

    def restore(self, records: list[dict[str, Any]]) -> None:
        """Bring back history after a restart; devices count as offline until they speak again."""
        with self._lock:
            for d in records:
                rec = self._get(d["device_id"])
                rec.capabilities = d.get("capabilities", {})
                rec.agent_version = d.get("agent_version", "")
                rec.rounds_assigned = int(d.get("rounds_assigned", 0))
                rec.rounds_completed = int(d.get("rounds_completed", 0))
                rec.deadlines_missed = int(d.get("deadlines_missed", 0))
                rec.declines = int(d.get("declines", 0))
                rec.updates_rejected = int(d.get("updates_rejected", 0))
                rec.throughput_sps = d.get("throughput_sps")
                rec.latency_s = d.get("latency_s")
                rec.energy_j = float(d.get("energy_j", 0.0))
