"""Export a model to ONNX and check the export against PyTorch: shared by both roles.

The aggregator exports the global model for the fleet (aggregator/deploy.py, which adds the int8
variant); a device that trains exports its personal model for itself (device/personal/serving.py).
Both must produce the same graph, checked the same way, so they share this code.

The export pins the opset and gives the batch axis a symbolic size, so one file serves batch 1
on a device and batch 64 in a benchmark. Metadata (model version, round, input shape, labels,
accuracy) travels inside the file, where ONNX Runtime can read it back.

torch's exporter keeps global state while it traces (its training-mode switch, its symbolic
registry), so exports in one process take turns: the local launcher runs many devices, and an
aggregator, in one process.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgefl.atomic import write_atomic

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

_EXPORTING = threading.Lock()


def onnx_bytes(
    model: nn.Module,
    input_shape: tuple[int, ...],
    metadata: Mapping[str, object] | None = None,
) -> bytes:
    """``model`` as a checked ONNX file, in memory."""
    import onnx

    model.train(False)  # export the inference graph
    dummy = torch.zeros((1, *input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with _EXPORTING, warnings.catch_warnings():
        # the TorchScript exporter is stable and exact for these models; its deprecation notice
        # is not something a user of edgefl can act on
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write ``model`` as ONNX to ``path`` atomically; returns the path."""
    return write_atomic(path, onnx_bytes(model, input_shape, metadata))


def onnx_logits(model_file: str | Path | bytes, X: np.ndarray) -> np.ndarray:
    """ONNX Runtime's logits on ``X`` for a model given as a file or as its bytes."""
    import onnxruntime as ort

    source = model_file if isinstance(model_file, bytes) else str(model_file)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(X, dtype=np.float32)})[0]


def parity(model_file: str | Path | bytes, model: nn.Module, X: np.ndarray) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's logits on ``X``."""
    from edgefl.training import predict_logits

    return float(np.abs(onnx_logits(model_file, X) - predict_logits(model, X)).max())
