"""The devices this aggregator works with: a plain list of enrolled device ids.

The broker already refuses anyone without an account. This list is the aggregator's own check
on top: status, telemetry and updates from a device that is not on it are ignored and counted,
so an account created by mistake (or by someone else) on a shared broker cannot reach the model.

The file holds one device id per line; ``#`` starts a comment. ``edgefl enroll --registry FILE``
adds to it. The aggregator rereads it when it changes, so enrolling a device needs no restart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from edgefl.config import NAME_RE

log = logging.getLogger(__name__)


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
    """Membership test against the list; without a file, every device is accepted."""

    def __init__(self, path: str | Path | None, recheck_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self._ids: set[str] = set()
        self._mtime = -1.0
        self._checked = 0.0
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        if self.path is not None:
            self._reload(force=True)
            log.info("%d enrolled devices in %s", len(self._ids), self.path)

    def _reload(self, force: bool = False) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as e:
            if force:
                raise FileNotFoundError(f"enrolled devices file {self.path}: {e}") from None
            return  # keep the last list we read rather than lock everyone out
        if force or mtime != self._mtime:
            self._ids, self._mtime = read_ids(self.path), mtime

    def __contains__(self, device_id: str) -> bool:
        if self.path is None:
            return True
        with self._lock:
            if device_id not in self._ids and time.monotonic() - self._checked > self._recheck_s:
                self._checked = time.monotonic()
                self._reload()
            return device_id in self._ids
