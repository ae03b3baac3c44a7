"""Exporting the global model to ONNX and rolling it out to the fleet.

The export is checked against PyTorch before it goes anywhere. The rollout publishes the model
retained on model/onnx with its SHA-256; each device verifies it, installs it atomically and
reports the version it serves in its status, which is how the rollout knows it has landed.
A device that was offline gets the retained model when it connects.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from aggregator.registry import DeviceRecord, DeviceRegistry
from edgefl.messages import OnnxModel, encode_onnx
from edgefl.models import ModelInfo
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

log = logging.getLogger(__name__)


def export(
    model: nn.Module,
    info: ModelInfo,
    out_dir: Path,
    *,
    version: int,
    round_: int,
    accuracy: float | None,
    check_X: np.ndarray | None,
    name: str = "model",
) -> dict[str, Any]:
    """Write ``model`` as ONNX into ``out_dir`` and measure its parity with PyTorch."""
    from edgefl.onnx_export import export_onnx, parity

    metadata = {
        "edgefl_model": info.name,
        "model_version": version,
        "round": round_,
        "input_shape": json.dumps(list(info.input_shape)),
        "labels": json.dumps(list(range(info.num_classes))),
        "accuracy": "" if accuracy is None else f"{accuracy:.6f}",
    }
    path = export_onnx(model, out_dir / f"{name}-v{version}.onnx", info.input_shape, metadata)
    if check_X is None:  # no held-out data: random inputs still catch a broken export
        check_X = np.random.default_rng(0).random((256, *info.input_shape), dtype=np.float32)
    diff = parity(path, model, check_X)
    size = path.stat().st_size
    log.info("exported %s (%d bytes); parity with PyTorch: max |diff| = %.3g", path, size, diff)
    return {
        "path": str(path),
        "bytes": size,
        "parity_max_abs": diff,
        "version": version,
        "metadata": metadata,
    }


def _serving_all(version: int):
    def check(records: list[DeviceRecord]) -> bool:
        online = [r for r in records if r.online]
        return bool(online) and all(r.serving == version for r in online)

    return check


class Rollout:
    def __init__(
        self, link: MqttLink, topics: Topics, registry: DeviceRegistry, model_name: str
    ) -> None:
        self.link = link
        self.topics = topics
        self.registry = registry
        self.model_name = model_name

    def publish(self, exported: dict[str, Any], round_: int, timeout_s: float = 60.0) -> dict:
        """Publish an exported model (retained) and wait until every online device serves it."""
        msg = OnnxModel(
            version=exported["version"],
            round=round_,
            model=self.model_name,
            body=Path(exported["path"]).read_bytes(),
            metadata={k: str(v) for k, v in exported["metadata"].items()},
        )
        payload = encode_onnx(msg)
        started = time.perf_counter()
        self.link.publish(self.topics.model_onnx, payload, qos=1, retain=True)
        done = self.registry.wait_for(_serving_all(msg.version), timeout_s)
        took = time.perf_counter() - started
        online = self.registry.online()
        serving = [r for r in online if r.serving == msg.version]
        accs = [r.serving_accuracy for r in serving if r.serving_accuracy is not None]
        if done:
            log.info(
                "ONNX v%d served by all %d online devices after %.3f s",
                msg.version,
                len(online),
                took,
            )
        else:
            log.warning(
                "ONNX v%d served by %d of %d online devices after %.0f s",
                msg.version,
                len(serving),
                len(online),
                timeout_s,
            )
        return {
            "version": msg.version,
            "bytes": len(payload),
            "sha256": msg.sha256,
            "devices_online": len(online),
            "devices_serving": len(serving),
            "rollout_s": took,
            "device_accuracy_mean": float(np.mean(accs)) if accs else None,
        }
