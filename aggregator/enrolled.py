"""The devices this aggregator works with: a plain list of enrolled device ids.

The broker already refuses anyone without an account. This list is the aggregator's own check
on top: status, telemetry and updates from a device that is not on it are ignored and counted,
so an account created by mistake (or by someone else) on a shared broker cannot reach the model.

The file holds one device id per line; ``#`` starts a comment. ``edgefl enroll`` adds to it
(``LIST_FILE`` in the broker's directory, or ``--registry FILE``). The aggregator rereads it when
it changes, so enrolling a device needs no restart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from edgefl.config import NAME_RE, ConfigError

log = logging.getLogger(__name__)

# What ``edgefl enroll`` writes in the broker's directory unless told another path; the demo
# uses the same name in its run directory.
LIST_FILE = "enrolled-devices.txt"


def read_ids(path: str | Path) -> set[str]:
    ids = set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not NAME_RE.match(entry):
            log.warning("%s:%d: %r is not a valid device id; skipped", path, n, entry)
            continue
        ids.add(entry)
    return ids


def add_ids(path: str | Path, device_ids: list[str]) -> None:
    """Append ids that are not on the list yet (creating the file)."""
    path = Path(path)
    known = read_ids(path) if path.exists() else set()
    new = [d for d in device_ids if d not in known]
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("".join(f"{d}\n" for d in new))


class EnrolledDevices:
    """Membership test against the list; without a file, every device is accepted (and a
    warning says so once)."""

    def __init__(self, path: str | Path | None, recheck_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self._ids: set[str] = set()
        self._mtime = -1.0
        self._checked = 0.0
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        if self.path is None:
            # Said once, at start: an operator who never set the list should learn that the
            # broker's password file is then the only thing between a stray account and the model.
            log.warning(
                "no enrolled_devices list is set: every device the broker admits will be "
                "accepted. Set enrolled_devices in the aggregator's config to the file "
                "`edgefl enroll` writes (%s in the broker's directory, or its --registry FILE)",
                LIST_FILE,
            )
        else:
            self._reload(force=True)
            log.info("%d enrolled devices in %s", len(self._ids), self.path)

    def _reload(self, force: bool = False) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as e:
            if force:
                # A configuration error (the command line exits 2, systemd does not loop) that
                # says how to get the file, rather than a bare traceback.
                why = e.strerror or e
                raise ConfigError(
                    f"enrolled_devices: cannot read {self.path} ({why}). `edgefl enroll ... "
                    f"--registry {self.path}` creates it; if the devices were enrolled on "
                    f"the broker's machine, copy {LIST_FILE} from the broker's directory here. "
                    "Remove enrolled_devices from the config to accept every device the broker "
                    "lets in."
                ) from None
            return  # keep the last list we read rather than lock everyone out
        if force or mtime != self._mtime:
            self._ids, self._mtime = read_ids(self.path), mtime

    def ids(self) -> set[str] | None:
        """The enrolled ids as the list says now; None without a list (any device goes)."""
        if self.path is None:
            return None
        with self._lock:
            if time.monotonic() - self._checked > self._recheck_s:
                self._checked = time.monotonic()
                self._reload()
            return set(self._ids)

    def __contains__(self, device_id: str) -> bool:
        if self.path is None:
            return True
        with self._lock:
            if device_id not in self._ids and time.monotonic() - self._checked > self._recheck_s:
                self._checked = time.monotonic()
                self._reload()
            return device_id in self._ids
