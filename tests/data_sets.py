"""Helpers for the data tests: data sets made by the test, and the rule for the real ones."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import numpy as np
import pytest

LABELS = ["PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"]
CHANNELS = ["ax", "ay", "az", "wx", "wy", "wz"]


def require_installed(present: bool, what: str, how: str) -> None:
    """A data set that `make setup` installs: without it a developer's run skips (saying what to
    run), but CI fails, since CI runs the set-up and the test must not silently vanish there."""
    if present:
        return
    message = f"{what} is not installed; {how}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI runs `make setup`, which installs it)")
    pytest.skip(message)


def watch_dict(subjects: int = 3, seed: int = 0, lengths: list[int] | None = None) -> dict:
    """A small stand-in for seglearn's watch data set, in its layout: every subject does every
    exercise with each arm; ``side`` is float as in the original."""
    rng = np.random.default_rng(seed)
    y, subject, side = [], [], []
    for s in range(1, subjects + 1):
        for c in range(len(LABELS)):
            for arm in (0.0, 1.0):
                y.append(c)
                subject.append(s)
                side.append(arm)
    n = len(y)
    lengths = lengths or rng.integers(150, 400, n).tolist()
    X = [rng.normal(size=(length, 6)) for length in lengths[:n]]
    return {
        "X": X,
        "y": np.array(y, dtype=np.int64),
        "subject": np.array(subject, dtype=np.int64),
        "side": np.array(side, dtype=np.float64),
        "X_labels": list(CHANNELS),
        "y_labels": list(LABELS),
    }


def pickled_npy(obj: Any) -> tuple[bytes, str]:
    """``obj`` saved the way seglearn saved its dict (a pickled 0-d object array), and the
    SHA-256 of those bytes."""
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()
