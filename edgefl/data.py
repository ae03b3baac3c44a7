"""Data: scikit-learn's bundled digits, partitioners that spread it over a fleet, and the loader a
device uses for the data it holds (an ``.npz`` file with ``X`` and ``y``).

The B1 protocol of docs/benchmarks.md: digits / 16, stratified 80/20 split with ``random_state=0``,
Dirichlet label skew with alpha 0.5 over 20 devices, seed 0, at least 10 samples per device.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefl.atomic import replacing

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    X: np.ndarray  # float32, (samples, features)
    y: np.ndarray  # int64, (samples,)

    def __len__(self) -> int:
        return len(self.y)


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train and test splits of the 1,797 8x8 digits, features scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return Dataset(X_tr, y_tr), Dataset(X_te, y_te)


def dirichlet_partition(
    y: np.ndarray, num_devices: int, alpha: float, seed: int = 0, min_samples: int = 10
) -> list[np.ndarray]:
    """Label-skewed split: each class's samples go to devices in Dirichlet(alpha) proportions.

    Redraws until every device holds at least ``min_samples`` (the usual protocol, e.g. Hsu et
    al. 2019, "Measuring the Effects of Non-Identical Data Distribution").
    """
    if num_devices < 1:
        raise ValueError("need at least one device")
    if num_devices * min_samples > len(y):
        raise ValueError(f"{len(y)} samples cannot give {num_devices} devices {min_samples} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _attempt in range(10_000):
        parts: list[list[int]] = [[] for _ in range(num_devices)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            share = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(share) * len(idx)).astype(int)[:-1]
            for dev, chunk in enumerate(np.split(idx, cuts)):
                parts[dev].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise RuntimeError(
        f"no Dirichlet(alpha={alpha}) draw gave every device {min_samples} samples; "
        "raise alpha or lower min_samples"
    )


def iid_partition(n: int, num_devices: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and deal out evenly."""
    if num_devices < 1 or num_devices > n:
        raise ValueError(f"cannot deal {n} samples to {num_devices} devices")
    idx = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(idx, num_devices)]


def partition(
    y: np.ndarray, num_devices: int, kind: str, alpha: float, seed: int, min_samples: int
) -> list[np.ndarray]:
    if kind == "dirichlet":
        return dirichlet_partition(y, num_devices, alpha, seed, min_samples)
    if kind == "iid":
        return iid_partition(len(y), num_devices, seed)
    raise ValueError(f"unknown partition {kind!r}: use 'dirichlet' or 'iid'")


def save_npz(path: str | Path, data: Dataset) -> None:
    """Write atomically, so a device never reads half a file."""
    with replacing(path) as tmp, tmp.open("wb") as f:
        np.savez(f, X=data.X.astype(np.float32), y=data.y.astype(np.int64))


def load_npz(path: str | Path, features: int | None = None, classes: int | None = None) -> Dataset:
    """A device's local data, checked: ``X`` 2-D finite floats, ``y`` integer labels in range."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"local data file {path} does not exist")
    # allow_pickle=False: an .npz may hold pickled objects, which would run code on load
    try:
        loaded = np.load(path, allow_pickle=False)
    except (EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError(f"{path}: not an .npz archive holding arrays X and y")
    with loaded as z:
        missing = {"X", "y"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (need X and y)")
        X = np.asarray(z["X"], dtype=np.float32)
        y = np.asarray(z["y"])
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"{path}: X must be (samples, features) and y (samples,)")
    if len(y) == 0:
        raise ValueError(f"{path}: holds no samples")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: y must hold integer class labels")
    if not np.isfinite(X).all():
        raise ValueError(f"{path}: X holds NaN or Inf")
    if features is not None and X.shape[1] != features:
        raise ValueError(f"{path}: X has {X.shape[1]} features, the model takes {features}")
    if classes is not None and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{path}: labels must lie in [0, {classes})")
    return Dataset(X, y.astype(np.int64))
