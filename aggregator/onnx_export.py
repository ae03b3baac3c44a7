"""The int8 variant of an exported model, made with ONNX Runtime's quantisation tools.

The fp32 export and its check against PyTorch are shared with the devices, which export their
personal models themselves: they live in edgefl/onnx_export.py and are named here too, so that
the aggregator's export code finds the whole of its export in one place.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgefl.atomic import replacing
from edgefl.onnx_export import (  # noqa: F401 (the aggregator's export names them here)
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    export_onnx,
    onnx_logits,
    parity,
)

# Operators whose int8 form needs activation ranges known in advance. ONNX Runtime's dynamic
# quantisation turns a Conv into ConvInteger, which computes each activation's range at run time
# and is several times slower than the float model (cnn_fmnist at batch 1: 336 us against
# 66 us fp32, 77 us static); a static QDQ graph runs as fused integer kernels.
STATIC_OPS = frozenset({"Conv", "ConvTranspose"})
# Rows per calibration run. The calibrator keeps every activation of every calibration sample
# until it has seen them all (cnn_fmnist: about 140 KB a sample, 36 MB for 256), which is why
# the aggregator calibrates on a sample of its held-out data (deploy.calibration_samples), not
# all of it.
CALIBRATION_BATCH = 32


def quantisation_method(path: str | Path) -> str:
    """``"static"`` for a graph with convolutions, else ``"dynamic"``: how
    :func:`quantize_int8` makes its int8 variant."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return "static" if any(node.op_type in STATIC_OPS for node in graph.node) else "dynamic"


class _Batches:
    """ONNX Runtime's CalibrationDataReader over an array: one input dict per batch, then None."""

    def __init__(self, X: np.ndarray) -> None:
        X = np.ascontiguousarray(X, dtype=np.float32)
        step = CALIBRATION_BATCH
        self._batches = iter([{INPUT_NAME: X[i : i + step]} for i in range(0, len(X), step)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(src: str | Path, dst: str | Path, calibration: np.ndarray | None = None) -> Path:
    """An int8 variant of an exported model, made with ONNX Runtime's quantisation tools
    (weights as int8 with one scale per tensor, activations int8). The metadata is kept.

    - A model with convolutions is quantised statically in QDQ form (QuantizeLinear and
      DequantizeLinear pairs around each operator, which ONNX Runtime fuses into integer
      kernels): every activation's scale is fixed from its range over ``calibration`` (MinMax
      over a few hundred held-out samples, shape ``(samples, *input_shape)``), so it is
      required. Measured on cnn_fmnist trained to 88.1 % on Fashion-MNIST (calibrated on 256
      test images, three different picks): 26.7 % of the fp32 file's bytes, test accuracy
      -0.14 to -0.24 points. Per-channel weight scales did worse (-0.25 to -0.32) and ran 2x
      slower at batch 1; 64 or 1,024 calibration samples instead of 256 moved accuracy by less
      than 0.1 point.
    - Any other model (the MLPs) is quantised dynamically: MatMul/Gemm weights int8,
      activations quantised on the fly from their range at run time; ``calibration`` is not
      used. On the MLPs this matched or beat static quantisation (mlp_digits: -0.0 points
      against -0.3 static) at the same size and speed.

    Both first run ONNX Runtime's quantisation pre-processing, shape inference only: its graph
    optimisation step would stamp the file with opset imports of every ONNX Runtime domain,
    which an older ONNX Runtime on a device may refuse, and finds nothing to fuse in these
    models (ONNX Runtime optimises the graph again when it loads it). The step tags the model as
    pre-processed, which is also what keeps ONNX Runtime from warning "Please consider to run
    pre-processing before quantization" into the operator's log
    (tests/test_onnx_export.py checks that it stays quiet).
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    static = quantisation_method(src) == "static"
    if static:
        if calibration is None or len(calibration) == 0:
            raise ValueError(
                f"{src} has convolutions, which are quantised statically: give calibration data "
                "(a few hundred held-out samples)"
            )
        reader = _Batches(calibration)
    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="edgefl-quant-") as scratch, replacing(dst) as tmp:
        pre = Path(scratch) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_optimization=True)
        if static:
            quantize_static(
                str(pre),
                str(tmp),
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=False,
            )
        else:
            quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8)
    return dst
