"""The hardware a device agent runs on: its readings, how long work takes, what it costs.

Two kinds, one interface, chosen by the ``[profile]`` table of the device's configuration:

- :class:`RealHardware` reads the machine through psutil (battery and temperature where the
  board has sensors) and adds nothing to the time work takes. Its uplink bandwidth it learns
  from the agent's timed uploads (device.telemetry.LinkEstimator), unless ``link_kbps`` fixes it.
- :class:`SimulatedHardware` plays a device of another kind on this machine: ``slowdown`` times
  slower, with a battery that drains with the energy its work uses and may be charging, and an
  upload link of ``link_kbps``. Slowness and bandwidth take real wall time (the agent sleeps for
  the extra compute time, and for payload bytes / bandwidth before an upload), so round times,
  deadlines and stragglers in a simulated fleet are real; only the battery is a model.

Both estimate energy with the same power model (docs/architecture.md leaves it to the profile):

    energy_j = cpu_s * compute_w + upload_s * radio_w

and a battery of ``battery_wh`` loses ``energy_j / (battery_wh * 3600) * 100`` percent for it:
that is the drain per unit of work. A charging battery gains its net charging power meanwhile:
a simulated device knows it (``charge_w``), so work that draws more than that drains it too; a
real device cannot tell its charger's power, so on its charger it counts as not draining.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Any

from device.telemetry import LinkEstimator, read_battery, read_system
from edgefl.config import ConfigError, ProfileConfig
from edgefl.messages import PowerModel, Telemetry


class Hardware:
    """The machine as it is (a real device)."""

    simulated = False

    def __init__(self, profile: ProfileConfig) -> None:
        self.profile = profile
        self.power = PowerModel(profile.compute_w, profile.radio_w, profile.battery_wh)
        self._lock = threading.Lock()
        self.energy_j = 0.0  # spent on work since the agent started
        self.battery_start_pct, _ = self.battery()
        # the lowest battery level right after any work that made it fall (charging or not)
        self.lowest_after_work_pct: float | None = None
        # a real device's uplink: fixed by its profile, or learnt from its uploads
        self.uplink = LinkEstimator(max(1, profile.link_min_bytes))

    # -- readings -------------------------------------------------------------------------------

    def telemetry(self, samples: int) -> Telemetry:
        return read_system(samples, self.link_kbps())

    def link_kbps(self) -> float | None:
        """The uplink bandwidth to report: the profile's, else the measured one (None until an
        upload large enough to judge by was timed)."""
        return self.profile.link_kbps or self.uplink.kbps

    @property
    def measures_link(self) -> bool:
        """Whether the agent should time its uploads for :meth:`observe_upload`."""
        return not self.profile.link_kbps

    def observe_upload(self, nbytes: int, seconds: float) -> None:
        """One upload of ``nbytes`` took ``seconds`` from publish to PUBACK."""
        if self.measures_link:
            self.uplink.observe(nbytes, seconds)

    def battery(self) -> tuple[float | None, bool | None]:
        """(percent, charging), or (None, None) on mains power or without a sensor."""
        return read_battery()

    def capabilities(self) -> dict[str, Any]:
        caps: dict[str, Any] = {"power": asdict(self.power), "simulated": self.simulated}
        charge_w = self.charge_w()
        if charge_w is not None:
            caps["charge_w"] = charge_w  # lets the scheduler size work for a charging battery
        return caps

    def charge_w(self) -> float | None:
        """Net power into the battery while charging; None where it is not known (a real
        device: psutil says only that it is plugged in)."""
        return None

    # -- time -----------------------------------------------------------------------------------

    def compute(self, samples: int, real_s: float, real_cpu_s: float) -> tuple[float, float]:
        """(wall seconds, CPU seconds) that training on ``samples`` takes on this hardware,
        given what it took on this machine."""
        return real_s, real_cpu_s

    def predict_compute_s(self, samples: int, measured_sps: float | None) -> float | None:
        """Seconds that training on ``samples`` will take; None if not known yet."""
        return samples / measured_sps if measured_sps else None

    def upload_s(self, nbytes: int) -> float:
        """Extra seconds an upload of ``nbytes`` takes beyond the real network."""
        return 0.0

    def expected_upload_s(self, nbytes: int) -> float:
        """Seconds the radio is busy sending ``nbytes``, by the link bandwidth this hardware
        reports (0 while it knows none), for energy estimates."""
        kbps = self.link_kbps()
        return nbytes * 8 / (kbps * 1000.0) if kbps else 0.0

    # -- energy ---------------------------------------------------------------------------------

    def energy(self, cpu_s: float, upload_s: float) -> float:
        return cpu_s * self.power.compute_w + upload_s * self.power.radio_w

    def percent_of(self, joules: float) -> float:
        """Battery percent that ``joules`` take."""
        return joules / (self.power.battery_wh * 3600.0) * 100.0

    def net_j(self, joules: float, seconds: float, charging: bool | None) -> float | None:
        """What work using ``joules`` over ``seconds`` takes out of the battery, net of
        charging (negative: the battery still gains); None if it cannot drain it (no battery,
        or charging at a power this hardware cannot tell)."""
        if not charging:
            return joules
        charge_w = self.charge_w()
        return None if charge_w is None else joules - charge_w * seconds

    def drain_pct(self, compute_s: float, upload_s: float) -> float:
        """How far below its present level training for ``compute_s`` and then uploading for
        ``upload_s`` takes the battery at the lowest point, in percent (0: it does not fall).
        The lowest point may come before the end: charging can make up during the upload for
        what the training took."""
        pct, charging = self.battery()
        if pct is None:
            return 0.0
        p = self.power
        train = self.net_j(compute_s * p.compute_w, compute_s, charging)
        upload = self.net_j(upload_s * p.radio_w, upload_s, charging)
        if train is None or upload is None:
            return 0.0
        return self.percent_of(max(0.0, train, train + upload))

    def spend(self, joules: float, seconds: float = 0.0) -> None:
        """Account for work done that used ``joules`` over ``seconds``; a simulated battery
        drains by it (and gained meanwhile if charging). A battery that fell by the work, while
        charging or not, counts for :attr:`lowest_after_work_pct`."""
        with self._lock:
            self.energy_j += joules
        self._note_level(joules, seconds)

    def _note_level(self, joules: float, seconds: float) -> None:
        pct, charging = self.battery()
        if pct is None:
            return
        net = self.net_j(joules, seconds, charging)
        if net is not None and net > 0:
            with self._lock:
                low = self.lowest_after_work_pct
                self.lowest_after_work_pct = pct if low is None else min(low, pct)

    def report(self) -> dict[str, Any]:
        """Figures for the agent's statistics at exit."""
        pct, charging = self.battery()
        return {
            "energy_j": self.energy_j,
            "battery_start_pct": self.battery_start_pct,
            "battery_pct": pct,
            "charging": charging,
            "lowest_after_work_pct": self.lowest_after_work_pct,
        }


RealHardware = Hardware


class SimulatedHardware(Hardware):
    """A device of another kind, played on this machine from its profile."""

    simulated = True

    def __init__(self, profile: ProfileConfig) -> None:
        if profile.slowdown < 1.0:
            raise ConfigError(f"profile.slowdown must be at least 1, not {profile.slowdown}")
        if profile.battery_pct is not None and not 0.0 <= profile.battery_pct <= 100.0:
            raise ConfigError(f"profile.battery_pct must be 0-100, not {profile.battery_pct}")
        if (
            profile.battery_wh <= 0
            or profile.base_sps < 0
            or profile.link_kbps < 0
            or profile.charge_w < 0
            or profile.mem_available_mb < 0
        ):
            raise ConfigError(
                "profile.battery_wh must be positive; base_sps, link_kbps, charge_w and "
                "mem_available_mb >= 0"
            )
        self._level = profile.battery_pct
        self._charging = bool(profile.charging) if profile.battery_pct is not None else None
        self._since = time.monotonic()
        super().__init__(profile)

    def telemetry(self, samples: int) -> Telemetry:
        reading = read_system(samples, self.link_kbps())
        reading.battery_percent, reading.charging = self.battery()
        if self.profile.mem_available_mb > 0:
            reading.mem_available_mb = self.profile.mem_available_mb
        return reading

    @property
    def measures_link(self) -> bool:
        return False  # the profile is the link; 0 means no limit, not unknown

    def charge_w(self) -> float | None:
        return self.profile.charge_w if self._level is not None else None

    def battery(self) -> tuple[float | None, bool | None]:
        with self._lock:
            if self._level is None:
                return None, None
            now = time.monotonic()
            if self._charging:
                gained = self.percent_of(self.profile.charge_w * (now - self._since))
                self._level = min(100.0, self._level + gained)
            self._since = now
            return self._level, self._charging

    def compute(self, samples: int, real_s: float, real_cpu_s: float) -> tuple[float, float]:
        p = self.profile
        if p.base_sps > 0:
            # the simulated device computes at its own pace; never faster than this machine
            sim = samples * p.slowdown / p.base_sps
            return max(real_s, sim), max(real_cpu_s, sim)
        return real_s * p.slowdown, real_cpu_s * p.slowdown

    def predict_compute_s(self, samples: int, measured_sps: float | None) -> float | None:
        p = self.profile
        if p.base_sps > 0:
            return samples * p.slowdown / p.base_sps
        return samples * p.slowdown / measured_sps if measured_sps else None

    def upload_s(self, nbytes: int) -> float:
        return self.expected_upload_s(nbytes)  # the simulated link is all there is

    def spend(self, joules: float, seconds: float = 0.0) -> None:
        self.battery()  # bring charging up to now first: it went on during the work
        with self._lock:
            if self._level is not None:
                self._level = max(0.0, self._level - self.percent_of(joules))
        super().spend(joules, seconds)


def make_hardware(profile: ProfileConfig) -> Hardware:
    return SimulatedHardware(profile) if profile.simulated else Hardware(profile)
