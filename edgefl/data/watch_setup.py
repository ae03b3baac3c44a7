"""Set-up only, never at run time: fetch seglearn 1.2.5's wheel and convert its watch data set
into the plain ``.npz`` that edgefl/data/watch.py reads.

    python -m edgefl.data.watch_setup [--out FILE] [--wheel FILE] [--force]

``make setup`` runs it. The wheel is fetched with ``pip download --no-deps`` (seglearn is not
installed) into a temporary folder. Its ``seglearn/data/watch_dataset.npy`` holds a pickled
Python dict, and unpickling runs code: this module is the one place that does it, and only
after the file's SHA-256 matched the one pinned below, so only those exact bytes are ever
unpickled. Quick when the output already exists and loads (without pickle).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.atomic import replacing
from edgefl.data.watch import (
    CHANNELS,
    WatchRecordings,
    load_watch_recordings,
    watch_npz_path,
    windows,
)

REQUIREMENT = "seglearn==1.2.5"
MEMBER = "seglearn/data/watch_dataset.npy"
# sha256 of MEMBER in seglearn-1.2.5-py3-none-any.whl (the wheel's own: ec6b952c...7413dd)
MEMBER_SHA256 = "eb122f23cdf06ef6bd6c6c5312958ec5cf9d038e2e6d457b8081662c75a42537"


def fetch_wheel(dest: Path) -> Path:
    """Download the seglearn wheel alone (no dependencies, nothing installed) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--quiet", "--dest", str(dest), REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()}")
    wheels = sorted(dest.glob("seglearn-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {len(wheels)} seglearn wheels in {dest}")
    return wheels[0]


def read_member(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not a seglearn wheel holding {MEMBER} ({e})") from None


def convert_watch_pickle(npy: bytes, sha256: str = MEMBER_SHA256) -> WatchRecordings:
    """The recordings of seglearn's ``watch_dataset.npy`` (a 0-d object array holding a dict:
    ``X`` a list of (readings, 6) arrays, ``y``, ``subject``, ``side`` one value per recording,
    ``X_labels`` and ``y_labels`` the names), checked. Unpickles only bytes whose SHA-256 is
    ``sha256``."""
    digest = hashlib.sha256(npy).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"{MEMBER} has SHA-256 {digest}, not the pinned {sha256}: refusing to unpickle it"
        )
    # The one allow_pickle=True in edgefl: set-up time, pinned bytes (checked just above).
    obj: Any = np.load(io.BytesIO(npy), allow_pickle=True)
    data = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object else obj
    if not isinstance(data, dict):
        raise ValueError(f"{MEMBER}: expected a dict, found {type(data).__name__}")
    missing = {"X", "y", "subject", "side", "X_labels", "y_labels"} - set(data)
    if missing:
        raise ValueError(f"{MEMBER}: missing {sorted(missing)}")
    series = [np.asarray(x, dtype=np.float64) for x in data["X"]]
    if not series or any(x.ndim != 2 or x.shape[1] != CHANNELS for x in series):
        raise ValueError(f"{MEMBER}: every recording must be (readings, {CHANNELS})")
    per_recording = {}
    for key in ("y", "subject", "side"):
        values = np.asarray(data[key])
        if values.shape != (len(series),) or not np.all(values == np.round(values)):
            raise ValueError(f"{MEMBER}: {key} must hold one whole number per recording")
        per_recording[key] = values.astype(np.int64)
    lengths = [len(x) for x in series]
    rec = WatchRecordings(
        signal=np.concatenate(series).astype(np.float32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        label=per_recording["y"],
        subject=per_recording["subject"],
        side=per_recording["side"],
        channel_names=tuple(str(s) for s in data["X_labels"]),
        label_names=tuple(str(s) for s in data["y_labels"]),
    )
    rec.check(MEMBER)
    return rec


def write_watch_npz(rec: WatchRecordings, out: str | Path) -> Path:
    """Write the converted set atomically, then read it back the way run time does."""
    out = Path(out)
    # readable by everyone, as the rest of a venv is (a temporary file starts at 0600)
    with replacing(out, mode=0o644) as tmp, tmp.open("wb") as f:
        np.savez(f, **rec.arrays())
    load_watch_recordings(out)
    return out


def summary(rec: WatchRecordings) -> str:
    data = windows(rec)
    assert data.subjects is not None
    subjects, per_subject = np.unique(data.subjects, return_counts=True)
    return (
        f"{len(rec)} recordings, {len(rec.signal)} readings of {', '.join(rec.channel_names)}; "
        f"{len(np.unique(rec.subject))} subjects, classes {', '.join(rec.label_names)}; "
        f"{len(data)} windows of {data.X.shape[1]} features, per subject "
        + ", ".join(f"{s}: {c}" for s, c in zip(subjects, per_subject, strict=True))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgefl.data.watch_setup", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=None, help=f"default: {watch_npz_path()}")
    parser.add_argument("--wheel", type=Path, help="use this seglearn 1.2.5 wheel, not pip's")
    parser.add_argument("--force", action="store_true", help="convert again even if done")
    args = parser.parse_args(argv)
    out = args.out or watch_npz_path()
    if out.exists() and not args.force:
        try:
            load_watch_recordings(out)
            print(f"watch data: {out} (already converted)")
            return 0
        except ValueError as e:
            print(f"watch data: {out} is unusable ({e}); converting again")
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="edgefl-seglearn-") as tmp:
            wheel = args.wheel or fetch_wheel(Path(tmp))
            rec = convert_watch_pickle(read_member(wheel))
        write_watch_npz(rec, out)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"watch data: {e}", file=sys.stderr)
        return 1
    print(f"watch data: {out} in {time.perf_counter() - t0:.1f} s: {summary(rec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
