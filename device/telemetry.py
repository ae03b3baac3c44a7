"""Telemetry readers: what a device says about its resources, in the Telemetry message format.

On real hardware everything comes from psutil; battery and temperature are None where the board
has no sensor (a Raspberry Pi on mains power has no battery). The uplink bandwidth has no sensor:
the agent measures it from its own uploads (:class:`LinkEstimator`). A simulated device reads
the same fields from its profile instead.
"""

from __future__ import annotations

import threading
import time

import psutil

from edgefl.messages import Telemetry


def _cpu_temperature() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    # Raspberry Pi OS reports the SoC as "cpu_thermal"; x86 boards as "coretemp" / "k10temp"
    for name in ("cpu_thermal", "coretemp", "k10temp", "soc_thermal"):
        if sensors.get(name):
            return float(sensors[name][0].current)
    for entries in sensors.values():
        if entries:
            return float(entries[0].current)
    return None


_BATTERY_TTL_S = 5.0
_battery_cache: tuple[float, tuple[float | None, bool | None]] = (-1e9, (None, None))


def read_battery() -> tuple[float | None, bool | None]:
    """(percent, charging) from the machine's battery; (None, None) where it has none.

    Read at most every few seconds: a battery changes slowly, and reading it means a walk
    through /sys that a busy device should not repeat for every task.
    """
    global _battery_cache
    at, value = _battery_cache
    now = time.monotonic()
    if now - at < _BATTERY_TTL_S:
        return value
    value = _read_battery()
    _battery_cache = (now, value)
    return value


def _read_battery() -> tuple[float | None, bool | None]:
    read = getattr(psutil, "sensors_battery", None)
    if read is None:
        return None, None
    try:
        battery = read()
    except (OSError, RuntimeError):
        return None, None
    if battery is None:
        return None, None
    return float(battery.percent), bool(battery.power_plugged)


# psutil measures a process's CPU share between two calls on the same Process object: one, kept
# for the life of the agent, makes every reading the share since the previous report
_SELF = psutil.Process()
_SELF_LOCK = threading.Lock()


def read_agent() -> tuple[float | None, float | None]:
    """(CPU percent, resident MiB) of this process: the agent itself, where ``cpu_percent`` of
    :func:`read_system` is the whole machine. (None, None) if the system will not say."""
    try:
        with _SELF_LOCK:
            cpu = _SELF.cpu_percent(interval=None)
            rss = _SELF.memory_info().rss / 2**20
    except (psutil.Error, OSError):
        return None, None
    return float(cpu), float(rss)


def read_system(samples: int, link_kbps: float | None = None) -> Telemetry:
    """The machine's own readings right now; ``link_kbps`` is what the caller knows of its
    uplink (see :class:`LinkEstimator`), None if nothing yet."""
    battery_percent, charging = read_battery()
    agent_cpu, agent_rss = read_agent()
    return Telemetry(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        mem_available_mb=psutil.virtual_memory().available / 2**20,
        samples=samples,
        battery_percent=battery_percent,
        charging=charging,
        temperature_c=_cpu_temperature(),
        link_kbps=link_kbps,
        agent_cpu_percent=agent_cpu,
        agent_rss_mb=agent_rss,
    )


class LinkEstimator:
    """Uplink bandwidth in kbit/s, learnt from timed uploads and smoothed.

    A sample is the bytes of one QoS 1 publish over the time from handing it to the MQTT client
    until its PUBACK came back. That time is transfer plus one round trip (and the broker's
    handling), so a small payload over a fast link measures mostly the round trip and would
    make the link look far slower than it is; worse, the scheduler would then pick a more
    compressed codec, whose smaller updates would keep the estimate low. So payloads under
    ``min_bytes`` are ignored, and nothing is reported until one sample counted. The estimate
    remains somewhat conservative (the round trip is in every sample), which errs towards
    compressing a little more, not towards missing a deadline.

    Samples are smoothed exponentially (weight ``smoothing`` for the newest): a link's speed
    wanders, and one upload delayed by a busy broker should not swing the codec choice.
    """

    def __init__(self, min_bytes: int = 16384, smoothing: float = 0.5) -> None:
        if min_bytes < 1 or not 0.0 < smoothing <= 1.0:
            raise ValueError("min_bytes must be >= 1 and smoothing in (0, 1]")
        self.min_bytes = min_bytes
        self.smoothing = smoothing
        self._kbps: float | None = None
        self._lock = threading.Lock()

    def observe(self, nbytes: int, seconds: float) -> bool:
        """Count one upload of ``nbytes`` that took ``seconds``; False if it was ignored."""
        if nbytes < self.min_bytes or seconds <= 0:
            return False
        kbps = nbytes * 8 / seconds / 1000.0
        with self._lock:
            old = self._kbps
            self._kbps = kbps if old is None else self.smoothing * kbps + (1 - self.smoothing) * old
        return True

    @property
    def kbps(self) -> float | None:
        """The estimate; None until an upload large enough to judge by has been timed."""
        with self._lock:
            return self._kbps


def capabilities() -> dict[str, object]:
    """Static facts for the birth certificate."""
    import platform

    return {
        "cpu_count": psutil.cpu_count() or 1,
        "mem_total_mb": round(psutil.virtual_memory().total / 2**20),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
