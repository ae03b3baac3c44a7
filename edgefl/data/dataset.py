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
from edgefl.errors import UsageError

log = logging.getLogger(__name__)


class DataMissingError(UsageError, FileNotFoundError):
    """A data set that set-up installs is not there; the message says which command installs it."""


class DataFileError(UsageError, ValueError):
    """A data file (a device's data, the aggregator's eval_data) cannot be used as it is."""


class DataFileMissing(DataFileError, FileNotFoundError):
    """A data file that a configuration names is not there."""


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


def load_npz(
    path: str | Path,
    features: int | None = None,
    classes: int | None = None,
    *,
    setting: str = "the data path",
) -> Dataset:
    """A device's local data, checked: ``X`` 2-D finite floats, ``y`` integer labels in range.

    ``setting`` names the configuration key the path came from (``data``, ``eval_data``), for
    the fix the error gives (a :class:`DataFileError`)."""
    path = Path(path)
    fix = (
        f"point {setting} at an .npz file holding X (samples x features, finite floats) and y "
        "(integer class labels), e.g. one written by edgefl.data.save_npz"
    )

    def bad(problem: str) -> DataFileError:
        return DataFileError(f"{path}: {problem}", fix)

    if not path.exists():
        raise DataFileMissing(f"data file {path} does not exist", fix)
    # allow_pickle=False: an .npz may hold pickled objects, which would run code on load
    try:
        loaded = np.load(path, allow_pickle=False)
    except (EOFError, zipfile.BadZipFile) as e:
        raise bad(f"not a readable .npz file ({e})") from None
    except ValueError:  # numpy took it for a pickle, which it refuses to load
        raise bad("not an .npz archive holding arrays X and y") from None
    except OSError as e:  # a directory, no permission
        raise bad(f"cannot be read ({e.strerror or e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
        raise bad("not an .npz archive holding arrays X and y")
    with loaded as z:
        missing = {"X", "y"} - set(z.files)
        if missing:
            raise bad(f"missing arrays {sorted(missing)} (need X and y)")
        try:
            X = np.asarray(z["X"], dtype=np.float32)
            y = np.asarray(z["y"])
        except (ValueError, TypeError) as e:  # object arrays (pickled), strings ...
            raise bad(f"X and y must be numeric arrays ({e})") from None
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise bad("X must be (samples, features) and y (samples,)")
    if len(y) == 0:
        raise bad("holds no samples")
    if not np.issubdtype(y.dtype, np.integer):
        raise bad("y must hold integer class labels")
    if not np.isfinite(X).all():
        raise bad("X holds NaN or Inf")
    if features is not None and X.shape[1] != features:
        raise bad(f"X has {X.shape[1]} features, the model takes {features}")
    if classes is not None and (y.min() < 0 or y.max() >= classes):
        raise bad(f"labels must lie in [0, {classes})")
    return Dataset(X, y.astype(np.int64))
