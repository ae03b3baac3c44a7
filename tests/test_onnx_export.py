"""ONNX export and int8 quantisation (aggregator/onnx_export.py) of every model in the catalogue,
and serving the results with ONNX Runtime alone (device/inference.py). No broker: the rollout of
these files is tested in test_deploy.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from aggregator.deploy import calibration_sample
from aggregator.onnx_export import (
    export_onnx,
    onnx_logits,
    parity,
    quantisation_method,
    quantize_int8,
)
from device.inference import InferenceServer
from edgefl.models import MODELS, build_model, model_info
from edgefl.training import train_local
from tests import synthetic

torch.set_num_threads(1)

CNNS = ["cnn_fmnist", "cnn_watch"]
EPOCHS = {"cnn_fmnist": 4, "cnn_watch": 8}  # enough for the synthetic tasks (test_models.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """Each CNN trained on its synthetic task, and its fp32 export: int8 predictions can only be
    compared with fp32 ones where the model is confident, not on an untrained model's ties."""
    out = {}
    for name in CNNS:
        model = build_model(name, seed=0)
        train_local(
            model, synthetic.for_model(name, 256), epochs=EPOCHS[name], batch_size=32, lr=0.3
        )
        path = tmp_path_factory.mktemp(name) / "model.onnx"
        export_onnx(model, path, model_info(name).input_shape, {"model_version": 7})
        out[name] = (model, path)
    return out


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_exports_within_the_parity_tolerance(name: str, tmp_path: Path) -> None:
    info = model_info(name)
    model = build_model(name, seed=0)
    path = export_onnx(model, tmp_path / "m.onnx", info.input_shape)
    X = np.random.default_rng(0).random((64, *info.input_shape), dtype=np.float32)
    # deploy.parity_tolerance (1e-4) is what an export must meet to be rolled out
    assert parity(path, model, X) <= 1e-4
    assert onnx_logits(path, X[:1]).shape == (1, info.num_classes)  # any batch size


@pytest.mark.parametrize("name", CNNS)
def test_trained_cnn_export_parity(trained, name: str) -> None:
    model, path = trained[name]
    X = synthetic.for_model(name, 512, seed=3).X
    got = parity(path, model, X)
    assert got <= 1e-4, got
    # a flat input is unflattened by a single Reshape: no shape arithmetic in the graph, which
    # ONNX Runtime's quantisation pre-processing cannot follow
    ops = op_types(path)
    assert ops.count("Reshape") == 1 and "Shape" not in ops and "Slice" not in ops
    assert ops.count("Conv") == 2


def test_convolutional_models_are_quantised_statically_the_mlps_dynamically(
    trained, tmp_path: Path
) -> None:
    assert {n: quantisation_method(trained[n][1]) for n in CNNS} == dict.fromkeys(CNNS, "static")
    mlp = export_onnx(build_model("mlp_digits", seed=0), tmp_path / "mlp.onnx", (64,))
    assert quantisation_method(mlp) == "dynamic"
    q = quantize_int8(mlp, tmp_path / "mlp.int8.onnx")  # no calibration needed
    ops = set(op_types(q))
    # weights int8, activations quantised at run time from their own range
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    assert "QuantizeLinear" not in ops


@pytest.mark.parametrize("name", CNNS)
def test_cnn_int8_is_static_qdq_small_and_agrees_with_fp32(trained, name, tmp_path) -> None:
    model, fp32 = trained[name]
    calibration = calibration_sample(synthetic.for_model(name, 1000, seed=4).X, 256)
    q = quantize_int8(fp32, tmp_path / "model.int8.onnx", calibration)
    ops = op_types(q)
    # static QDQ: activations go through QuantizeLinear/DequantizeLinear pairs with scales fixed
    # at calibration; nothing is quantised on the fly, and no ConvInteger (dynamic's Conv)
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    assert "DynamicQuantizeLinear" not in ops and "ConvInteger" not in ops
    weights = {t.name: t for t in onnx.load(str(q)).graph.initializer}
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        assert weights[f"{layer}.weight_quantized"].data_type == onnx.TensorProto.INT8
    # cnn_fmnist is at 26.7 % of its fp32 file; cnn_watch, 16k parameters, carries the same few
    # KB of tensor names and scales on a quarter of the weights (37 %)
    limit = 0.30 if name == "cnn_fmnist" else 0.40
    assert q.stat().st_size <= limit * fp32.stat().st_size, q.stat().st_size / fp32.stat().st_size
    test = synthetic.for_model(name, 1000, seed=5)
    fp32_classes = onnx_logits(fp32, test.X).argmax(1)
    int8_classes = onnx_logits(q, test.X).argmax(1)
    assert (fp32_classes == test.y).mean() > 0.8
    assert (int8_classes == fp32_classes).mean() >= 0.97
    # the metadata a device reads travels on
    assert {p.key: p.value for p in onnx.load(str(q)).metadata_props}["model_version"] == "7"


def test_a_convolutional_model_without_calibration_data_is_refused(trained, tmp_path) -> None:
    with pytest.raises(ValueError, match="calibration data"):
        quantize_int8(trained["cnn_fmnist"][1], tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="calibration data"):
        quantize_int8(trained["cnn_fmnist"][1], tmp_path / "q.onnx", np.zeros((0, 784)))
    assert not (tmp_path / "q.onnx").exists()


def test_calibration_sample_is_a_seeded_spread_pick() -> None:
    X = np.arange(1000, dtype=np.float32).reshape(500, 2)  # rows sorted, as a file by class
    pick = calibration_sample(X, 100)
    assert pick.shape == (100, 2)
    np.testing.assert_array_equal(pick, calibration_sample(X, 100))  # reproducible
    rows = pick[:, 0] // 2
    assert np.all(np.diff(rows) > 0)  # distinct rows, in file order
    assert rows.min() < 50 and rows.max() > 450  # from the whole file, not its first rows
    np.testing.assert_array_equal(calibration_sample(X[:30], 100), X[:30])  # fewer: all
    with pytest.raises(ValueError):
        calibration_sample(X, 0)


@pytest.mark.parametrize("name", CNNS)
def test_a_device_serves_both_variants_of_a_cnn_from_flat_rows(trained, name, tmp_path) -> None:
    """device/inference.py serves CNNs as it serves MLPs: the input is the flat feature row."""
    _, fp32 = trained[name]
    q = quantize_int8(fp32, tmp_path / "model.int8.onnx", synthetic.for_model(name, 256, seed=4).X)
    test = synthetic.for_model(name, 200, seed=6)
    for path in (fp32, q):
        server = InferenceServer()
        server.load(path)
        assert server.version == 7
        logits = server.logits(test.X)
        assert logits.shape == (200, model_info(name).num_classes)
        np.testing.assert_array_equal(server.predict(test.X), onnx_logits(path, test.X).argmax(1))
        # one sample as a 1-D row, as `edgefl predict` and the HTTP endpoint pass it
        np.testing.assert_array_equal(server.logits(test.X[0]), logits[:1])
        assert (server.predict(test.X) == test.y).mean() > 0.8
    assert server.metadata["model_version"] == "7"


# ONNX Runtime logs this (a root-logger warning) when it quantises a model that has not been
# through its quantisation pre-processing; the export runs that step, so operators never see it
PRE_PROCESSING_HINT = "Please consider to run pre-processing before quantization"


@pytest.mark.parametrize("name", ["mlp_digits", "cnn_fmnist"])
def test_an_int8_export_logs_no_pre_processing_hint(
    name, digits, tmp_path: Path, caplog
) -> None:
    from onnxruntime.quantization import quantize_dynamic

    from aggregator import deploy

    caplog.set_level(logging.INFO)
    model, info = build_model(name, seed=0), model_info(name)
    # the check can see the hint: a model quantised without the pre-processing gets it
    bare = export_onnx(model, tmp_path / "bare.onnx", info.input_shape)
    quantize_dynamic(str(bare), str(tmp_path / "bare.int8.onnx"))
    assert PRE_PROCESSING_HINT in caplog.text
    caplog.clear()
    held_out = digits[1] if name == "mlp_digits" else synthetic.for_model(name, 64, seed=5)
    entry = deploy.export(model, info, deploy.store_for(tmp_path), version=1, round_=1,
                          accuracy=None, eval_data=held_out, calibration_samples=32)
    assert "int8" in entry["variants"]
    assert caplog.records  # the export did log (its own lines, ONNX Runtime's INFO)
    assert PRE_PROCESSING_HINT not in caplog.text
