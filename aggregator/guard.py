"""What one device may cost the fleet: a message budget, rejection accounting, quarantine.

Every message from a device passes :meth:`Guard.admit` before anything is decoded. A device
that sends faster than its token bucket allows (``quarantine.rate_per_s``, ``burst``), or sends
more than ``max_invalid`` invalid messages within ``window_s``, is quarantined: the callback
given to the guard cuts it off at the broker (edgefl/dynsec.py), and what is still queued from it
is dropped unread for ``hold_s``. Cutting it off at the broker is what protects its neighbours:
the broker's queue to the aggregator is shared, and a flood dropped only here would already have
pushed honest updates out of it.

Rejections are counted by kind and reason, and logged at most once per device per
``log_interval_s`` with the counts since the last line, so a flood cannot fill a disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefl.config import QuarantineConfig

log = logging.getLogger(__name__)

# Reasons an honest device produces in the normal course of things: an update that arrives after
# its round closed (or, in chunks, is cut off by its close), a QoS 1 redelivery, a device not
# (yet) on the enrolled list, an agent of an older format version during a rolling upgrade, a
# slow device's update in asynchronous mode that arrives too stale to fold.
BENIGN = frozenset({"round", "base_version", "duplicate", "no_round", "not_participant",
                    "not_enrolled", "version", "incomplete", "stale"})


@dataclass
class _Device:
    tokens: float
    at: float  # monotonic time the bucket was last filled
    invalid: deque[float] = field(default_factory=deque)  # times of recent invalid messages
    logged_at: float = -float("inf")
    unlogged: Counter[str] = field(default_factory=Counter)  # rejections since the last line


@dataclass
class Quarantine:
    device_id: str
    reason: str
    at: float  # unix time
    dropped: int = 0  # messages from it dropped unread since


class Guard:
    """Thread-safe: the network thread admits and rejects; the round loop reads."""

    def __init__(
        self,
        cfg: QuarantineConfig,
        on_quarantine: Callable[[str, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self._on_quarantine = on_quarantine
        self._clock = clock
        self._devices: dict[str, _Device] = {}
        self._held: dict[str, float] = {}  # device -> monotonic time its hold ends
        self._lock = threading.Lock()
        self.quarantined: dict[str, Quarantine] = {}
        self.rejected: Counter[str] = Counter()  # "kind/reason" -> count
        self.quarantines = 0

    def _device(self, device_id: str, now: float) -> _Device:
        dev = self._devices.get(device_id)
        if dev is None:
            dev = self._devices[device_id] = _Device(float(self.cfg.burst), now)
        return dev

    def admit(self, device_id: str) -> bool:
        """Count one message from ``device_id``; False: drop it unread (it is quarantined)."""
        now = self._clock()
        with self._lock:
            held = self._held.get(device_id)
            if held is not None:
                if now < held:
                    self.quarantined[device_id].dropped += 1
                    return False
                # the hold is over: a message now means the broker let the device in again
                del self._held[device_id]
                q = self.quarantined.pop(device_id, None)
                if q is not None:
                    log.warning("%s is back after its quarantine (re-admitted at the broker)",
                                device_id)
            if not self.cfg.enabled:
                return True
            dev = self._device(device_id, now)
            refill = (now - dev.at) * self.cfg.rate_per_s
            dev.tokens = min(float(self.cfg.burst), dev.tokens + refill)
            dev.at = now
            dev.tokens -= 1.0
            if dev.tokens >= 0:
                return True
            reason = (
                f"sent more than {self.cfg.burst} messages above {self.cfg.rate_per_s:g} per second"
            )
        self.quarantine(device_id, reason)
        return False

    def reject(self, device_id: str | None, kind: str, reason: str, detail: str) -> None:
        """Count and (rate-limited) log a message refused with ``reason``; quarantine a device
        that sends too many invalid ones."""
        now = self._clock()
        key = f"{kind}/{reason}"
        quarantine = None
        with self._lock:
            self.rejected[key] += 1
            if device_id is None:
                log.warning("rejected %s: %s (%s)", kind, detail, reason)
                return
            dev = self._device(device_id, now)
            if now - dev.logged_at >= self.cfg.log_interval_s:
                earlier = _counts(dev.unlogged)
                dev.unlogged.clear()
                dev.logged_at = now
                log.warning(
                    "rejected %s from %s: %s (%s)%s", kind, device_id, detail, reason,
                    f"; since the last such line: {earlier}" if earlier else "",
                )
            else:
                dev.unlogged[key] += 1
            if self.cfg.enabled and reason not in BENIGN:
                dev.invalid.append(now)
                while dev.invalid and now - dev.invalid[0] > self.cfg.window_s:
                    dev.invalid.popleft()
                if len(dev.invalid) > self.cfg.max_invalid and device_id not in self._held:
                    quarantine = (
                        f"{len(dev.invalid)} invalid messages within {self.cfg.window_s:g} s "
                        f"(the last: {reason})"
                    )
        if quarantine is not None:
            self.quarantine(device_id, quarantine)

    def quarantine(self, device_id: str, reason: str) -> None:
        """Cut ``device_id`` off now (and drop what is still queued from it for ``hold_s``)."""
        with self._lock:
            if device_id in self._held:
                return
            self._held[device_id] = self._clock() + self.cfg.hold_s
            self.quarantined[device_id] = Quarantine(device_id, reason, time.time())
            self.quarantines += 1
            dev = self._devices.get(device_id)
            if dev is not None:  # a fresh budget if an operator lets it back in
                dev.tokens, dev.invalid = float(self.cfg.burst), deque()
        log.error(
            "quarantined %s: %s; it is cut off at the broker until `edgefl readmit %s`",
            device_id, reason, device_id,
        )
        self._on_quarantine(device_id, reason)

    def flush_log(self) -> None:
        """Log the rejections not logged yet (at the end of a round, and when stopping)."""
        with self._lock:
            pending = [(d, _counts(dev.unlogged)) for d, dev in self._devices.items()
                       if dev.unlogged]
            for d, _ in pending:
                self._devices[d].unlogged.clear()
                self._devices[d].logged_at = self._clock()
        for device_id, counts in pending:
            log.warning("rejected from %s since the last line: %s", device_id, counts)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """The quarantined devices, for the aggregator's status and metrics."""
        with self._lock:
            return {
                d: {"reason": q.reason, "at": q.at, "dropped": q.dropped}
                for d, q in self.quarantined.items()
            }


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{n} {key}" for key, n in counter.most_common())
