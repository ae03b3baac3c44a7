"""Local inference with the deployed ONNX model.

This module imports ONNX Runtime and numpy, never torch: a device that only serves predictions
does not need to load the training stack.

Models are installed into a directory as ``v{version}.onnx`` next to ``current.json``, which
names the version in service. Both are written atomically (temporary file, then rename), so a
power cut leaves the previous model in service rather than half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgefl.messages import OnnxModel

CURRENT = "current.json"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install(model_dir: str | Path, msg: OnnxModel) -> Path:
    """Write a received (already checksum-verified) model and make it the current one."""
    model_dir = Path(model_dir)
    path = model_dir / f"v{msg.version}.onnx"
    _atomic_write(path, msg.body)
    current = {
        "version": msg.version,
        "sha256": msg.sha256,
        "file": path.name,
        "metadata": msg.metadata,
    }
    _atomic_write(model_dir / CURRENT, json.dumps(current).encode())
    return path


def current(model_dir: str | Path) -> tuple[int, Path] | None:
    """The installed model in service: (version, path), or None."""
    model_dir = Path(model_dir)
    try:
        info = json.loads((model_dir / CURRENT).read_text())
        path = model_dir / Path(info["file"]).name
        if path.exists():
            return int(info["version"]), path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


class InferenceServer:
    """Holds one ONNX Runtime session and swaps it for a new version without dropping requests:
    a request in flight keeps the session it started with."""

    def __init__(self, threads: int = 1) -> None:
        self._lock = threading.Lock()
        self._session: ort.InferenceSession | None = None
        self._input = ""
        self.version: int | None = None
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1

    @classmethod
    def from_dir(cls, model_dir: str | Path, threads: int = 1) -> InferenceServer:
        server = cls(threads)
        found = current(model_dir)
        if found is None:
            raise FileNotFoundError(f"no model installed in {model_dir}")
        server.load(found[1], found[0])
        return server

    def load(self, path: str | Path, version: int) -> None:
        session = ort.InferenceSession(
            str(path), sess_options=self._options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        with self._lock:
            self._session, self._input, self.version = session, name, version

    @property
    def ready(self) -> bool:
        return self._session is not None

    def logits(self, X: np.ndarray) -> np.ndarray:
        with self._lock:
            session, name = self._session, self._input
        if session is None:
            raise RuntimeError("no model loaded yet")
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
        return session.run(None, {name: X})[0]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class ids for each row of ``X``."""
        return self.logits(X).argmax(axis=1)
