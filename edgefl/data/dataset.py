"""A data set in memory, and the file a device holds its data in (an ``.npz`` with ``X`` and ``y``).

The layout every data set follows: ``X`` is float32 (samples, features), flat; a model that
wants images or (channels, time) windows reshapes inside (edgefl/models.py).
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefl.atomic import replacing

log = logging.getLogger(__name__)


class DataMissingError(FileNotFoundError):
    """A data set that set-up installs is not there; the message says which command installs it."""


@dataclass
class Dataset:
    X: np.ndarray  # float32, (samples, features)
    y: np.ndarray  # int64, (samples,)
    # Who each sample came from (the watch set's wearers), for the natural partition; None for
    # data sets that do not record it. Never written to a device's file.
    subjects: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)


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
    except ValueError:  # neither .npz nor .npy: numpy takes it for a pickle, and refuses it
        raise ValueError(f"{path}: not an .npz archive holding arrays X and y") from None
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
