"""Smartwatch exercise data split by its real wearers: the watch data set of seglearn 1.2.5
(Burns et al. 2018, "Personalized Activity Recognition with Deep Triplet Embeddings"; seglearn:
Burns and Whyne 2018, JMLR 19(83)).

10 subjects wore a smartwatch while doing 7 shoulder exercises (PEN, ABD, FEL, IR, ER, TRAP,
ROW), each with either arm: 140 recordings of 6 channels -- accelerometer ax, ay, az (g) and
gyroscope wx, wy, wz (rad/s) -- at 50 Hz, 947 to 2,618 samples (19 to 52 s) long. Every subject
did every exercise once with each arm, so a subject's labels are balanced: what differs between
devices in the natural partition is the person, not the label mix.

The set ships as a pickled Python dict, which must never be unpickled at run time. ``make setup``
converts it once (edgefl/data/watch_setup.py) into a plain ``.npz`` of numeric and string arrays,
which this module reads with ``allow_pickle=False``. It lives at ``$EDGEFL_WATCH_NPZ``, else at
``<venv>/share/edgefl/watch.npz`` (``sys.prefix`` of the Python that runs edgefl).

Samples are windows of 100 readings (2 s) every 50 (1 s), never across two recordings. The
values stay in their physical units. A window's 600 features are channel-major:
``X[i].reshape(6, 100)`` is (channels, time), what a 1-D CNN takes (edgefl/models.py).
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefl.data.dataset import DataMissingError, Dataset

ENV_PATH = "EDGEFL_WATCH_NPZ"
SETUP_COMMAND = "make setup (or: python -m edgefl.data.watch_setup)"
CHANNELS = 6
CLASSES = 7
RATE_HZ = 50
WINDOW = 100  # samples: 2 s
STEP = 50  # samples: windows overlap by half
FEATURES = CHANNELS * WINDOW
# Held out for the test set by default (leave-subjects-out): the last two of the ten.
TEST_SUBJECTS = (9, 10)
ARRAYS = ("signal", "offsets", "label", "subject", "side", "channel_names", "label_names")


def watch_npz_path() -> Path:
    """Where the converted set is: ``$EDGEFL_WATCH_NPZ``, else ``<sys.prefix>/share/edgefl/``."""
    return Path(os.environ.get(ENV_PATH) or Path(sys.prefix) / "share" / "edgefl" / "watch.npz")


@dataclass(frozen=True)
class WatchRecordings:
    """The converted set: every recording's readings end to end, and per recording its label,
    subject and arm."""

    signal: np.ndarray  # float32 (readings, 6), all recordings one after another
    offsets: np.ndarray  # int64 (recordings + 1,): recording r is signal[offsets[r]:offsets[r+1]]
    label: np.ndarray  # int64 (recordings,), 0..6
    subject: np.ndarray  # int64 (recordings,), 1..10
    side: np.ndarray  # int64 (recordings,), 1 = right arm, 0 = left
    channel_names: tuple[str, ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.label)

    def check(self, where: str = "watch data") -> None:
        """Refuse anything the windowing and the models could not rely on."""
        r = len(self.label)
        if self.signal.ndim != 2 or self.signal.shape[1] != CHANNELS:
            raise ValueError(f"{where}: signal must be (readings, {CHANNELS})")
        if not np.isfinite(self.signal).all():
            raise ValueError(f"{where}: signal holds NaN or Inf")
        if any(a.shape != (r,) for a in (self.label, self.subject, self.side)):
            raise ValueError(f"{where}: label, subject and side need one value per recording")
        if self.offsets.shape != (r + 1,) or self.offsets[0] != 0:
            raise ValueError(f"{where}: offsets must be (recordings + 1,) starting at 0")
        if self.offsets[-1] != len(self.signal) or np.any(np.diff(self.offsets) <= 0):
            raise ValueError(f"{where}: offsets must rise and end at the signal's length")
        if r == 0 or self.label.min() < 0 or self.label.max() >= CLASSES:
            raise ValueError(f"{where}: labels must lie in [0, {CLASSES})")
        if len(self.channel_names) != CHANNELS or len(self.label_names) != CLASSES:
            raise ValueError(f"{where}: needs {CHANNELS} channel and {CLASSES} label names")

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the .npz file: numbers and fixed-width strings, no Python objects."""
        return {
            "signal": self.signal.astype(np.float32),
            "offsets": self.offsets.astype(np.int64),
            "label": self.label.astype(np.int64),
            "subject": self.subject.astype(np.int64),
            "side": self.side.astype(np.int64),
            "channel_names": np.array(self.channel_names, dtype=np.str_),
            "label_names": np.array(self.label_names, dtype=np.str_),
        }


def load_watch_recordings(path: str | Path | None = None) -> WatchRecordings:
    """Read the converted set (never the original pickle), checked."""
    path = Path(path) if path is not None else watch_npz_path()
    if not path.is_file():
        raise DataMissingError(
            f"the watch data set has not been converted: {path} does not exist. "
            f"Create it with {SETUP_COMMAND}, or set {ENV_PATH} to where it is"
        )
    try:
        loaded = np.load(path, allow_pickle=False)  # a pickle in it is refused, never run
    except (EOFError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); re-run {SETUP_COMMAND}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz archive; re-run {SETUP_COMMAND}")
    with loaded as z:
        missing = set(ARRAYS) - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; re-run {SETUP_COMMAND}")
        try:
            a = {name: z[name] for name in ARRAYS}
        except ValueError as e:  # an object array: "Object arrays cannot be loaded when ..."
            raise ValueError(f"{path}: {e}") from None
    for name in ("offsets", "label", "subject", "side"):
        if not np.issubdtype(a[name].dtype, np.integer):
            raise ValueError(f"{path}: {name} must hold integers")
    rec = WatchRecordings(
        signal=np.asarray(a["signal"], dtype=np.float32),
        offsets=a["offsets"].astype(np.int64),
        label=a["label"].astype(np.int64),
        subject=a["subject"].astype(np.int64),
        side=a["side"].astype(np.int64),
        channel_names=tuple(str(s) for s in a["channel_names"]),
        label_names=tuple(str(s) for s in a["label_names"]),
    )
    rec.check(str(path))
    return rec


def windows(rec: WatchRecordings, recordings: Sequence[int] | np.ndarray | None = None) -> Dataset:
    """Windows of ``WINDOW`` readings every ``STEP`` within each recording (none spans two), as
    a Dataset with X (windows, 600) channel-major, y the exercise and ``subjects`` the wearer."""
    chosen = range(len(rec)) if recordings is None else recordings
    X, y, subjects = [], [], []
    for r in chosen:
        sig = rec.signal[rec.offsets[r] : rec.offsets[r + 1]]
        if len(sig) < WINDOW:
            continue
        # (readings - WINDOW + 1, channels, WINDOW): every start, already channel-major
        w = np.lib.stride_tricks.sliding_window_view(sig, WINDOW, axis=0)[::STEP]
        X.append(w.reshape(len(w), FEATURES))
        y.append(np.full(len(w), rec.label[r], dtype=np.int64))
        subjects.append(np.full(len(w), rec.subject[r], dtype=np.int64))
    if not X:
        return Dataset(
            np.empty((0, FEATURES), np.float32), np.empty(0, np.int64), np.empty(0, np.int64)
        )
    return Dataset(
        np.ascontiguousarray(np.concatenate(X), dtype=np.float32),
        np.concatenate(y),
        np.concatenate(subjects),
    )


def load_watch_split(
    test_subjects: Sequence[int] = TEST_SUBJECTS, path: str | Path | None = None
) -> tuple[Dataset, Dataset]:
    """Leave-subjects-out: the windows of ``test_subjects`` are the test set, everyone else's
    the training set, so the test accuracy is that on people the model never saw."""
    rec = load_watch_recordings(path)
    known = sorted(set(rec.subject.tolist()))
    held = sorted(set(test_subjects))
    unknown = [s for s in held if s not in known]
    if unknown or not held or len(held) == len(known):
        raise ValueError(
            f"test subjects {list(test_subjects)} must be one or more, but not all, of the "
            f"subjects {known}"
        )
    is_test = np.isin(rec.subject, held)
    return windows(rec, np.flatnonzero(~is_test)), windows(rec, np.flatnonzero(is_test))
