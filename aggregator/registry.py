"""The aggregator's picture of the fleet, built from births, Last Wills, telemetry and updates."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edgefl.messages import Status, Telemetry


@dataclass
class DeviceRecord:
    device_id: str
    online: bool = False
    status_at: float = 0.0
    capabilities: dict[str, Any] = field(default_factory=dict)
    agent_version: str = ""
    telemetry: Telemetry | None = None
    telemetry_at: float = 0.0  # our clock, not the device's: device clocks drift
    rounds_assigned: int = 0
    rounds_completed: int = 0
    deadlines_missed: int = 0
    # samples per second of local training, smoothed over past updates
    throughput_sps: float | None = None
    serving: int | None = None  # ONNX model version the device serves
    serving_accuracy: float | None = None
    serving_seq: int | None = None  # the deployment it came with
    previous_accuracy: float | None = None

    @property
    def reliability(self) -> float:
        """Fraction of assigned rounds the device delivered in time (1.0 before any)."""
        if self.rounds_assigned == 0:
            return 1.0
        return self.rounds_completed / self.rounds_assigned


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

    def on_status(self, device_id: str, status: Status) -> None:
        with self._lock:
            rec = self._get(device_id)
            rec.online = status.state == "online"
            rec.status_at = time.time()
            if rec.online:
                rec.capabilities = dict(status.capabilities)
                rec.agent_version = status.agent_version
                rec.serving = status.serving
                rec.serving_accuracy = status.serving_accuracy
                rec.serving_seq = status.serving_seq
                rec.previous_accuracy = status.previous_accuracy
                if status.telemetry is not None:
                    # the birth's reading lets a device be scheduled before its first report
                    rec.telemetry = status.telemetry
                    rec.telemetry_at = time.time()
            self.changed.notify_all()

    def on_telemetry(self, device_id: str, telemetry: Telemetry) -> None:
        with self._lock:
            rec = self._get(device_id)
            rec.telemetry = telemetry
            rec.telemetry_at = time.time()
            self.changed.notify_all()

    def on_assigned(self, device_ids: list[str]) -> None:
        with self._lock:
            for d in device_ids:
                self._get(d).rounds_assigned += 1

    def on_update(self, device_id: str, samples_seen: float, train_s: float) -> None:
        with self._lock:
            rec = self._get(device_id)
            rec.rounds_completed += 1
            if train_s > 0 and samples_seen > 0:
                sps = samples_seen / train_s
                a = self._smoothing
                rec.throughput_sps = (
                    sps if rec.throughput_sps is None else a * sps + (1 - a) * rec.throughput_sps
                )

    def on_missed(self, device_ids: list[str]) -> None:
        with self._lock:
            for d in device_ids:
                self._get(d).deadlines_missed += 1

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

    def is_online(self, device_id: str) -> bool:
        with self._lock:
            rec = self._devices.get(device_id)
            return bool(rec and rec.online)

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

    def snapshot(self) -> list[dict[str, Any]]:
        """Plain data for checkpoints and metrics (telemetry as a dict)."""
        with self._lock:
            return [asdict(r) for r in self._devices.values()]

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
                rec.throughput_sps = d.get("throughput_sps")
