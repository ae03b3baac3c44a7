"""The aggregator's versioned store of exported models, and the history of rollouts.

    models/v{version}/model.onnx        fp32 export
    models/v{version}/model.int8.onnx   int8 variant (ONNX Runtime quantisation: static QDQ for
                                        convolutional models, dynamic for the others)
    models/v{version}/info.json         round, sizes, SHA-256s, parity, accuracies, metadata
    models/deployments.json             every rollout and rollback, oldest first

Files are written atomically; a rollback reads the history to find what the fleet served before.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from edgefl.atomic import write_atomic

FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def dir(self, version: int) -> Path:
        return self.root / f"v{version}"

    def file(self, version: int, variant: str) -> Path:
        if variant not in FILES:
            raise ValueError(f"unknown model variant {variant!r}; use fp32 or int8")
        return self.dir(version) / FILES[variant]

    def save_info(self, version: int, info: dict[str, Any]) -> None:
        _write_json(self.dir(version) / "info.json", info)

    def info(self, version: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir(version) / "info.json").read_text())
        except (OSError, ValueError):
            return None

    def versions(self) -> list[int]:
        out = []
        for d in self.root.glob("v*"):
            if d.name[1:].isdigit() and (d / "info.json").exists():
                out.append(int(d.name[1:]))
        return sorted(out)

    # -- rollout history ------------------------------------------------------------------------

    @property
    def _history_path(self) -> Path:
        return self.root / "deployments.json"

    def deployments(self) -> list[dict[str, Any]]:
        try:
            return json.loads(self._history_path.read_text())
        except (OSError, ValueError):
            return []

    def record(self, entry: dict[str, Any]) -> None:
        history = self.deployments()
        history.append({**entry, "ts": time.time()})
        _write_json(self._history_path, history)

    def next_seq(self) -> int:
        return 1 + max((d.get("seq", 0) for d in self.deployments()), default=0)

    def current(self) -> dict[str, Any] | None:
        """The fleet's model: the newest promoted rollout or rollback."""
        fleet = [d for d in self.deployments() if d.get("promoted")]
        return fleet[-1] if fleet else None

    def previous(self) -> dict[str, Any] | None:
        """What the fleet served before the current model (another version or variant)."""
        fleet = [d for d in self.deployments() if d.get("promoted")]
        if not fleet:
            return None
        now = fleet[-1]
        for d in reversed(fleet[:-1]):
            if (d["version"], d["variant"]) != (now["version"], now["variant"]):
                return d
        return None
