"""Export a model to ONNX and check the export against PyTorch.

The export pins the opset and gives the batch axis a symbolic size, so one file serves batch 1
on a device and batch 64 in a benchmark. Metadata (model version, round, input shape, labels,
accuracy) travels inside the file, where ONNX Runtime can read it back.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgefl.atomic import replacing, write_atomic

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write ``model`` as ONNX to ``path`` atomically; returns the path."""
    import onnx

    model.train(False)  # export the inference graph
    dummy = torch.zeros((1, *input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
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
    return write_atomic(path, proto.SerializeToString())


def onnx_logits(path: str | Path, X: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(X, dtype=np.float32)})[0]


def parity(path: str | Path, model: nn.Module, X: np.ndarray) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's logits on ``X``."""
    from edgefl.training import predict_logits

    return float(np.abs(onnx_logits(path, X) - predict_logits(model, X)).max())


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """An int8 variant of an exported model, made with ONNX Runtime's dynamic quantisation.

    Weights of MatMul/Gemm become int8 with a per-tensor scale; activations are quantised on the
    fly at run time, so no calibration data is needed. The metadata is kept.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with replacing(dst) as tmp:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    return Path(dst)
