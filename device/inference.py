"""Local inference with the deployed ONNX model, and the device's store of received models.

This module imports ONNX Runtime and numpy, never torch: a device, or a process on it, that only
serves predictions does not load the training stack.

    from device.inference import InferenceServer
    server = InferenceServer.from_dir("/var/lib/edgefl/device/models")
    classes = server.predict(X)          # X: (samples, features) float32

Received models, and the personal models a device builds (device/personal/serving.py), are kept
as ``{sha256}.onnx``, next to ``current.json``, which names the one in service. Both are written
atomically (temporary file, then rename), so a power cut leaves the previous model in service
rather than half a file. The last few models stay, so that a rollback
to one of them needs no download.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgefl.atomic import write_atomic
from edgefl.errors import UserError

CURRENT = "current.json"
KEEP = 3
# the variant of a model the device built itself (device/personal/serving.py): its info names
# the fleet's file it was built on as ``base_sha256``
PERSONAL = "personal"


class LocalModels:
    """The models a device holds, by SHA-256, and which one is in service."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)

    def path(self, sha256: str) -> Path | None:
        path = self.dir / f"{sha256}.onnx"
        return path if path.exists() else None

    def add(self, sha256: str, body: bytes) -> Path:
        """Store a received model (its checksum already verified)."""
        path = self.dir / f"{sha256}.onnx"
        if not path.exists():
            write_atomic(path, body)
        return path

    def set_current(self, info: dict[str, Any]) -> None:
        """Record what is in service (``info`` holds at least sha256 and version; a personal
        model's, the fleet's file it was built on as base_sha256, which is kept too)."""
        write_atomic(self.dir / CURRENT, json.dumps(info).encode())
        self._prune(keep={info["sha256"], info.get("base_sha256")})

    def current(self) -> dict[str, Any] | None:
        try:
            info = json.loads((self.dir / CURRENT).read_text())
            if isinstance(info, dict) and self.path(str(info["sha256"])) is not None:
                return info
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _prune(self, keep: set[str]) -> None:
        files = sorted(self.dir.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[KEEP:]:
            if old.stem not in keep:
                old.unlink(missing_ok=True)


class NoModelInstalled(UserError, FileNotFoundError):
    """A device's model directory holds no model in service (yet)."""


class InferenceServer:
    """Holds one ONNX Runtime session and swaps it for a new version without dropping requests:
    a request in flight keeps the session it started with."""

    def __init__(self, threads: int = 1) -> None:
        self._lock = threading.Lock()
        self._session: ort.InferenceSession | None = None
        self._input = ""
        self.version: int | None = None
        self.info: dict[str, Any] = {}
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1

    @classmethod
    def from_dir(cls, model_dir: str | Path, threads: int = 1) -> InferenceServer:
        """The model in service in a device's model directory."""
        store = LocalModels(model_dir)
        info = store.current()
        if info is None:
            raise NoModelInstalled(
                f"no model installed in {model_dir}",
                "a device installs the model the aggregator deploys at the end of training; "
                "wait for that, or give the device's state_dir/models directory (--model-dir) "
                "or an .onnx file (--model)",
            )
        server = cls(threads)
        server.load(store.path(info["sha256"]), info)
        return server

    def load(self, path: str | Path, info: dict[str, Any] | None = None) -> None:
        """Load a model file and put it in service; ``info`` describes it (version, sha256),
        else the version comes from the file's own metadata."""
        session = ort.InferenceSession(
            str(path), sess_options=self._options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        if info is None:
            meta = session.get_modelmeta().custom_metadata_map
            version = meta.get("model_version", "0")
            info = {"version": int(version) if version.isdigit() else 0}
        with self._lock:
            self._session, self._input = session, name
            self.version, self.info = int(info["version"]), dict(info)

    @property
    def ready(self) -> bool:
        return self._session is not None

    @property
    def metadata(self) -> dict[str, str]:
        with self._lock:
            session = self._session
        return dict(session.get_modelmeta().custom_metadata_map) if session else {}

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.logits_with_info(X)[0]

    def logits_with_info(self, X: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The logits, and the info of the model that gave them (a swap may come meanwhile)."""
        with self._lock:
            session, name, info = self._session, self._input, self.info
        if session is None:
            raise RuntimeError("no model loaded yet")
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
        return session.run(None, {name: X})[0], info

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class ids for each row of ``X``."""
        return self.logits(X).argmax(axis=1)

    def predict_with_info(self, X: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Class ids for each row of ``X``, and the info of the model that answered."""
        logits, info = self.logits_with_info(X)
        return logits.argmax(axis=1), info
