"""What a device needs to serve its personalised model: the global models it may be built on,
and the export of a personal model to ONNX, checked before anything serves it.

A personalised device serves neither the fleet's ONNX file nor a model the aggregator ever saw:
it builds its own from the global model of the deployment it follows and its personal state
(device/deployment.py asks for the weights through its ``personalise`` callback). So that a
rollback to an older global model can rebuild the personal model on it, the device keeps the
last few global models it received, by version (:class:`GlobalArchive`).

The export is the aggregator's own (edgefl/onnx_export.py), in fp32 always: the fleet's int8
variant is quantised and calibrated by the aggregator on its held-out data, which a device does
not have, and a device exports one small model at a time, so size matters less than exactness.
The exported file must give the PyTorch model's logits within :data:`PARITY_TOLERANCE` on the
check inputs, or :func:`build_personal_onnx` raises :class:`PersonalModelError` and nothing is
served from it.

numpy only at import: torch is loaded when a model is built, which only a training device does.
"""

from __future__ import annotations

import io
import logging
import os
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgefl.atomic import write_atomic

log = logging.getLogger(__name__)

# The bar for the served personal model against its PyTorch twin; the fleet's export is
# held to deploy.parity_tolerance (1e-4) because deeper models accumulate more rounding.
PARITY_TOLERANCE = 1e-5
CHECK_SAMPLES = 256  # rows of the check inputs the export is compared on
KEEP = 4


class PersonalModelError(Exception):
    """A personal model that must not be served; the message says why."""


def check_sample(X: np.ndarray, samples: int = CHECK_SAMPLES, seed: int = 0) -> np.ndarray:
    """At most ``samples`` rows of ``X``, a seeded pick spread over the whole array (local data
    files are often sorted by class)."""
    if len(X) <= samples:
        return X
    return X[np.sort(np.random.default_rng(seed).choice(len(X), samples, replace=False))]


def build_personal_onnx(
    model_name: str,
    weights: Mapping[str, np.ndarray],
    check_X: np.ndarray | None,
    *,
    metadata: Mapping[str, object] | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> bytes:
    """The personal model ``weights`` of ``model_name`` as an fp32 ONNX file, in memory.

    Its ONNX Runtime logits are compared with PyTorch's on a sample of ``check_X`` (the device's
    local data; None: seeded random inputs, which still catch a broken export). Raises
    :class:`PersonalModelError` if the weights do not fit the model or the two disagree by more
    than ``tolerance`` (NaN included)."""
    from edgefl import onnx_export
    from edgefl.models import build_model, model_info, set_weights

    info = model_info(model_name)
    model = build_model(model_name)
    try:
        set_weights(model, weights)
    except ValueError as e:
        raise PersonalModelError(f"the personal weights do not fit {model_name}: {e}") from e
    if check_X is None:
        X = np.random.default_rng(0).random((CHECK_SAMPLES, *info.input_shape), dtype=np.float32)
    else:
        X = check_sample(np.asarray(check_X, dtype=np.float32).reshape(-1, *info.input_shape))
    body = onnx_export.onnx_bytes(model, info.input_shape, metadata)
    diff = onnx_export.parity(body, model, X)
    # "not <=" so that NaN, what a broken graph often yields, is refused too
    if not diff <= tolerance:
        raise PersonalModelError(
            f"its ONNX export differs from PyTorch by up to {diff:.3g} on {len(X)} check inputs "
            f"(tolerance {tolerance:g})"
        )
    log.debug("personal %s exported: %d bytes, parity %.2g", model_name, len(body), diff)
    return body


class GlobalArchive:
    """The last ``keep`` global models a device remembered, by version, on its disk.

    Each is ``v{version}.npz`` of plain float32 arrays (no pickle either way), written
    atomically; the oldest remembered goes when a newer one is over ``keep``. Oldest by when it
    was remembered, not by number: an aggregator that was reset counts versions from 1 again.
    """

    def __init__(self, directory: str | Path, keep: int = KEEP) -> None:
        if keep < 1:
            raise ValueError(f"the archive must keep at least one model, not {keep}")
        self.dir = Path(directory)
        self.keep = keep

    def _file(self, version: int) -> Path:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"a model version is a count, not {version!r}")
        return self.dir / f"v{version}.npz"

    def remember(self, version: int, weights: Mapping[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:  # np.savez's layout, names kept exactly
            for name, w in weights.items():
                with z.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(
                        f, np.ascontiguousarray(w, dtype=np.float32), allow_pickle=False
                    )
        # order by when remembered, strictly: a coarse file clock gives two quick writes one time
        newest = max((p.stat().st_mtime_ns for p in self._files()), default=0)
        path = write_atomic(self._file(version), buf.getvalue())
        stamp = max(time.time_ns(), newest + 1)
        os.utime(path, ns=(stamp, stamp))
        self._drop_oldest()

    def get(self, version: int) -> dict[str, np.ndarray] | None:
        """The weights of ``version``, or None if it is not held (or its file is unreadable)."""
        path = self._file(version)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {name: z[name] for name in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            log.warning("global model v%d in %s is unreadable: %s", version, self.dir, e)
            return None

    def versions(self) -> list[int]:
        """The versions held, the most recently remembered last."""
        return [int(p.stem[1:]) for p in self._files()]

    def _files(self) -> list[Path]:
        files = [p for p in self.dir.glob("v*.npz") if p.stem[1:].isdigit()]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, int(p.stem[1:])))

    def _drop_oldest(self) -> None:
        files = self._files()
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)
