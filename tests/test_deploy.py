"""Deploying the global model as ONNX: export, chunked rollout over the real broker, canaries,
rollback, and serving on the device (ONNX Runtime only)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from aggregator import deploy, onnx_export
from aggregator.deploy import rollback_command
from aggregator.onnx_export import onnx_logits
from aggregator.store import ModelStore
from device.http import serve_http
from device.inference import InferenceServer, LocalModels
from edgefl.config import DeployConfig
from edgefl.models import ModelInfo, build_model, model_info, num_parameters, set_weights
from edgefl.mqtt import MqttLink
from edgefl.training import train_local
from tests import synthetic
from tests.conftest import FLEET, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _trained(fleet, devices: int, rounds: int = 2, **deploy):
    for i in range(devices):
        fleet.start_agent(i)
    cfg = fleet.aggregator_config(rounds=rounds)
    cfg.rounds.min_devices = devices
    cfg.deploy.rollout_timeout_s = 15.0
    cfg.deploy.canary_timeout_s = 10.0
    for k, v in deploy.items():
        setattr(cfg.deploy, k, v)
    return fleet.aggregator(cfg)


def test_rollout_reaches_every_device_including_a_late_one(make_fleet, digits) -> None:
    fleet = make_fleet(devices=3)
    # small chunks, so that the model travels in several retained pieces
    with _trained(fleet, devices=2, chunk_bytes=8192) as agg:
        agg.run()
        exported = agg.export()
        assert exported["parity_max_abs"] <= 1e-5
        deployed = agg.deploy(exported)
        assert deployed["promoted"] and deployed["chunks"] >= 4
        assert deployed["devices_serving"] == deployed["devices_online"] == 2
        # a device that was away during the rollout gets it when it comes
        late = fleet.start_agent(2)
        wait_until(lambda: late.server.version == exported["version"], what="the late device")
        wait_until(
            lambda: agg.registry.get("dev-2").serving_seq == deployed["seq"],
            what="the late device's status",
        )
    _, test = digits
    expected = onnx_logits(exported["path"], test.X).argmax(1)
    for agent in fleet.agents.values():
        assert agent.server.version == exported["version"]
        assert agent.server.info["sha256"] == deployed["sha256"]
        np.testing.assert_array_equal(agent.server.predict(test.X), expected)


def test_a_device_that_was_offline_during_a_rollout_serves_the_new_model(
    make_fleet, digits
) -> None:
    fleet = make_fleet(devices=2)
    _, test = digits
    with _trained(fleet, devices=2) as agg:
        agg.run()
        before = agg.export()
        first = agg.deploy(before)
        assert first["devices_serving"] == 2
        away = fleet.agents["dev-1"]
        assert away.server.version == first["version"]
        state_dir = Path(away.cfg.state_dir)
        away.stop()
        wait_until(lambda: not agg.registry.get("dev-1").online, what="dev-1 offline")

        # a new version, rolled out while dev-1 is away; its predictions differ from the
        # first model's, so serving the old one cannot pass for serving the new one
        _sabotage(agg)
        exported = agg.export()
        second = agg.deploy(exported)
        assert second["promoted"] and second["devices_online"] == second["devices_serving"] == 1
        expected = onnx_logits(exported["path"], test.X).argmax(1)
        assert not np.array_equal(expected, onnx_logits(before["path"], test.X).argmax(1))
        # dev-1 has never held it: it must fetch it when it comes back
        assert LocalModels(state_dir / "models").path(second["sha256"]) is None

        back = fleet.start_agent(1)  # a new agent on the same state_dir
        assert Path(back.cfg.state_dir) == state_dir
        wait_until(lambda: back.server.version == second["version"], what="dev-1 on the new model")
        wait_until(
            lambda: agg.registry.get("dev-1").serving_seq == second["seq"],
            what="dev-1 reporting the new deployment",
        )
    assert back.server.info["sha256"] == second["sha256"]
    assert LocalModels(state_dir / "models").current()["version"] == second["version"]
    np.testing.assert_array_equal(back.server.predict(test.X), expected)


def _publish_packet_bytes(topic: str, payload: bytes) -> int:
    """Size of the MQTT 5 PUBLISH packet (QoS 1, no properties) that carries ``payload``."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + len(payload)  # topic, packet id, properties
    varint = 1
    while remaining >= 128**varint:
        varint += 1
    return 1 + varint + remaining


def test_chunks_follow_the_brokers_packet_limit(make_fleet, broker, digits) -> None:
    fleet = make_fleet(devices=2)
    _, test = digits
    limit = broker.max_packet_size
    # the aggregator would cut chunks four times larger than the broker takes
    with _trained(fleet, devices=2, chunk_bytes=4 * limit) as agg:
        agg.registry.wait_online(2, 10)
        assert agg.link.max_packet_size == limit  # learnt from the broker's CONNACK
        # a model whose ONNX file is more than twice the broker's packet limit
        wide = nn.Sequential(nn.Linear(64, 8192), nn.ReLU(), nn.Linear(8192, 10))
        info = ModelInfo("mlp_digits", (64,), 10, lambda: wide, num_parameters(wide))
        exported = deploy.export(
            wide, info, agg.store, version=1, round_=0, accuracy=None, eval_data=test, int8=False
        )
        body = Path(exported["path"]).read_bytes()
        assert len(body) > 2 * limit

        seen: dict[str, bytes] = {}

        def on_chunk(topic: str, payload: bytes) -> None:
            if payload:  # not the clearing of an older model's retained chunks
                seen[topic] = payload

        # a read-only account sees every chunk as the broker passed it on
        watcher = MqttLink("test-watcher", broker.broker_config(broker.monitor), clean_start=True)
        watcher.subscribe(f"edgefl/{FLEET}/model/onnx/blob/#", on_chunk)
        with watcher:
            deployed = agg.rollout.publish(exported["version"])
            assert deployed["promoted"] and deployed["devices_serving"] == 2
            wait_until(lambda: len(seen) == deployed["chunks"], what="every chunk at the watcher")
    assert deployed["chunks"] >= 3
    assert all(_publish_packet_bytes(t, p) <= limit for t, p in seen.items())
    # what travelled is the file, whole, in order
    parts = sorted((msgpack.unpackb(p)["i"], msgpack.unpackb(p)["data"]) for p in seen.values())
    assert b"".join(data for _, data in parts) == body
    assert deployed["sha256"] == hashlib.sha256(body).hexdigest()
    expected = onnx_logits(exported["path"], test.X).argmax(1)
    for agent in fleet.agents.values():
        assert agent.deployment.store.path(deployed["sha256"]).read_bytes() == body
        np.testing.assert_array_equal(agent.server.predict(test.X), expected)


def _corrupting_export(real):
    """export_onnx that writes a slightly different model than it was given: what a broken
    exporter does. The difference (0.01 on one output's bias) barely changes predictions, so
    only the parity check can see it."""

    def export(model, path, input_shape, metadata=None):
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong[-1].bias[0] += 0.01
        return real(wrong, path, input_shape, metadata)

    return export


def test_an_export_that_disagrees_with_pytorch_is_not_rolled_out(
    make_fleet, monkeypatch, caplog
) -> None:
    fleet = make_fleet(devices=2)
    with _trained(fleet, devices=2) as agg:
        agg.run()
        good = agg.deploy(agg.export())
        assert good["promoted"]
        monkeypatch.setattr(onnx_export, "export_onnx", _corrupting_export(onnx_export.export_onnx))
        agg.version += 1  # the next model; its export goes wrong
        bad = agg.export()
        tolerance = agg.cfg.deploy.parity_tolerance
        assert bad["parity_max_abs"] > tolerance
        with caplog.at_level(logging.ERROR, logger="aggregator.deploy"):
            refused = agg.deploy(bad)
            # nor its int8 variant, which was made from the same broken file
            refused_int8 = agg.rollout.publish(bad["version"], "int8")
        assert not refused["promoted"] and "parity_tolerance" in refused["refused"]
        assert not refused_int8["promoted"] and "parity_tolerance" in refused_int8["refused"]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(f"refused to roll out model v{bad['version']}" in m for m in errors), errors
        # the fleet never saw it: the manifest and every device stay on the good model
        assert agg.store.current()["seq"] == good["seq"]
        assert all(a.server.info["seq"] == good["seq"] for a in fleet.agents.values())
        assert all(r.serving_seq == good["seq"] for r in agg.registry.online())

        # the refusal is the tolerance's doing: with a looser one the same export goes out
        agg.cfg.deploy.parity_tolerance = 0.1
        loose = agg.deploy(bad)
        assert loose["promoted"] and loose["devices_serving"] == 2
    assert all(a.server.version == bad["version"] for a in fleet.agents.values())


def test_int8_is_judged_by_accuracy_not_by_the_fp32_tolerance(make_fleet) -> None:
    fleet = make_fleet(devices=2)
    with _trained(fleet, devices=2) as agg:
        agg.run()
        exported = agg.export()
        entry = agg.store.info(exported["version"])
        int8 = entry["variants"]["int8"]
        # quantisation moves logits far more than the fp32 tolerance allows ...
        assert int8["parity_max_abs"] > agg.cfg.deploy.parity_tolerance
        # ... yet the int8 model goes out, its accuracy being within the margin of fp32's
        assert entry["variants"]["fp32"]["accuracy"] - int8["accuracy"] <= 0.02
        served = agg.rollout.publish(exported["version"], "int8")
        assert served["promoted"] and served["devices_serving"] == 2
        # with a margin it cannot meet it would not
        agg.cfg.deploy.int8_margin = -0.5
        again = agg.rollout.publish(exported["version"], "int8")
    assert not again["promoted"] and "int8_margin" in again["refused"]
    assert agg.store.current()["seq"] == served["seq"]


def test_export_makes_an_int8_variant_in_a_versioned_store(make_fleet, digits) -> None:
    fleet = make_fleet(devices=2)
    with _trained(fleet, devices=2, rounds=3) as agg:
        agg.run()
        exported = agg.export()
    v = exported["version"]
    info = json.loads((Path(agg.state_dir) / "models" / f"v{v}" / "info.json").read_text())
    fp32, int8 = info["variants"]["fp32"], info["variants"]["int8"]
    assert int8["bytes"] <= 0.4 * fp32["bytes"]
    assert int8["accuracy"] >= fp32["accuracy"] - 0.02
    meta = InferenceServer()
    meta.load(agg.store.file(v, "int8"))
    assert meta.version == v
    assert meta.metadata["model_version"] == str(v)
    assert json.loads(meta.metadata["input_shape"]) == [64]


def _sabotage(agg) -> None:
    """A new model version that is much worse than the current one."""
    rng = np.random.default_rng(1)
    agg.weights = {
        k: rng.normal(0, 0.5, w.shape).astype(np.float32) for k, w in agg.weights.items()
    }
    agg.version += 1
    set_weights(agg.model, agg.weights)


def test_a_canary_that_fails_its_health_check_is_not_promoted(make_fleet) -> None:
    fleet = make_fleet(devices=4)
    with _trained(fleet, devices=4, rounds=3) as agg:
        agg.run()
        good = agg.deploy(agg.export())
        _sabotage(agg)
        bad = agg.rollout.publish(agg.export()["version"], canary_fraction=0.5)
        assert not bad["promoted"]
        assert not bad["canary"]["healthy"]
        assert bad["canary"]["worst_accuracy_drop"] > 0.02
        canaries = bad["canary"]["devices"]
        assert len(canaries) == 2
        # the canaries went back to the fleet's model; the others never left it
        wait_until(
            lambda: all(r.serving_seq == good["seq"] for r in agg.registry.online()),
            what="everyone back on the good model",
        )
    for agent in fleet.agents.values():
        assert agent.server.version == good["version"]
    assert agg.store.current()["seq"] == good["seq"]


def test_a_healthy_canary_is_promoted(make_fleet) -> None:
    fleet = make_fleet(devices=4)
    with _trained(fleet, devices=4, rounds=2, canary_fraction=0.25) as agg:
        agg.run()
        first = agg.deploy(agg.export())
        agg.run(rounds=4)
        second = agg.deploy(agg.export())
    assert first["promoted"] and second["promoted"]
    assert second["canary"]["healthy"] and len(second["canary"]["devices"]) == 1
    assert second["devices_serving"] == 4
    assert all(a.server.version == second["version"] for a in fleet.agents.values())


def test_rollback_with_one_command(make_fleet) -> None:
    fleet = make_fleet(devices=2)
    agg = _trained(fleet, devices=2, rounds=2)
    with agg:
        agg.run()
        first = agg.deploy(agg.export())
        agg.run(rounds=3)
        second = agg.deploy(agg.export())
        assert second["version"] > first["version"]
        connects = agg.link.connects
        # the command a user runs: the aggregator's config and the operators' admin account,
        # while the aggregator runs, whose connection it must leave alone
        admin = fleet.broker.broker_config(fleet.broker.admin)
        result = rollback_command(agg.cfg, admin, None, None)
        assert agg.link.connected.is_set() and agg.link.connects == connects
    assert result["kind"] == "rollback" and result["version"] == first["version"]
    assert result["devices_serving"] == 2
    assert all(a.server.version == first["version"] for a in fleet.agents.values())
    assert agg.store.current()["version"] == first["version"]


def _two_models(tmp_path: Path, make_fleet) -> tuple[Path, Path]:
    fleet = make_fleet(devices=2)
    with _trained(fleet, devices=2, rounds=1) as agg:
        agg.run()
        a = agg.export()
        _sabotage(agg)
        b = agg.export()
    return Path(a["path"]), Path(b["path"])


def test_swapping_the_model_does_not_fail_requests_in_flight(tmp_path, make_fleet, digits) -> None:
    a, b = _two_models(tmp_path, make_fleet)
    _, test = digits
    expected = {onnx_logits(p, test.X[:64]).argmax(1).tobytes() for p in (a, b)}
    server = InferenceServer()
    server.load(a, {"version": 1})
    errors: list[BaseException] = []
    answers: list[bytes] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            try:
                answers.append(server.predict(test.X[:64]).tobytes())
            except BaseException as e:  # noqa: BLE001 - any failure is what we look for
                errors.append(e)

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    for i in range(30):
        server.load(b if i % 2 == 0 else a, {"version": 2 + i})
    stop.set()
    for t in askers:
        t.join()
    assert not errors
    assert len(answers) > 30 and set(answers) <= expected


def test_http_endpoint(tmp_path, make_fleet, digits) -> None:
    a, _ = _two_models(tmp_path, make_fleet)
    _, test = digits
    server = InferenceServer()
    server.load(a)
    httpd = serve_http(server, port=0)
    url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        body = json.dumps({"inputs": test.X[:5].tolist()}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/predict", body)) as r:
            reply = json.loads(r.read())
        assert reply["classes"] == server.predict(test.X[:5]).tolist()
        with urllib.request.urlopen(f"{url}/health") as r:
            assert json.loads(r.read())["ready"] is True
        for bad in (b"not json", b'{"inputs": [1, 2]}', b'{"inputs": [[1, 2]]}'):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(urllib.request.Request(f"{url}/predict", bad))
            assert info.value.code == 400
    finally:
        httpd.shutdown()


def test_predict_command_uses_onnx_runtime_only(tmp_path, make_fleet, digits) -> None:
    a, _ = _two_models(tmp_path, make_fleet)
    _, test = digits
    data = tmp_path / "x.npz"
    np.savez(data, X=test.X[:20], y=test.y[:20])
    code = (
        "import sys; from launch.cli import main; "
        f"rc = main(['predict', '--model', {str(a)!r}, '--json', {str(data)!r}]); "
        "assert 'torch' not in sys.modules, 'the inference path imported torch'; "
        "sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["classes"] == onnx_logits(a, test.X[:20]).argmax(1).tolist()
    assert "accuracy" in out.stderr


def test_device_serving_modules_do_not_import_torch() -> None:
    code = (
        "import sys, device.inference, device.deployment, device.http; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------
# export of a convolutional model (no broker)


def _cnn_export(tmp_path: Path, eval_data, **kw) -> tuple[ModelStore, dict]:
    model = build_model("cnn_fmnist", seed=0)
    train_local(model, synthetic.images(256), epochs=4, batch_size=32, lr=0.3)
    store = deploy.store_for(tmp_path)
    entry = deploy.export(
        model,
        model_info("cnn_fmnist"),
        store,
        version=1,
        round_=0,
        accuracy=None,
        eval_data=eval_data,
        **kw,
    )
    return store, entry


def test_a_cnn_is_calibrated_on_a_sample_of_the_held_out_data(tmp_path: Path) -> None:
    store, entry = _cnn_export(tmp_path, synthetic.images(600, seed=1), calibration_samples=200)
    assert entry["parity_max_abs"] <= 1e-4
    fp32, int8 = entry["variants"]["fp32"], entry["variants"]["int8"]
    assert int8["quantisation"] == "static" and int8["calibration_samples"] == 200
    assert int8["bytes"] <= 0.3 * fp32["bytes"]
    assert fp32["accuracy"] > 0.8
    assert int8["accuracy"] >= fp32["accuracy"] - 0.01
    ops = {n.op_type for n in onnx.load(str(store.file(1, "int8"))).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert deploy.refusal(store.info(1), "int8", DeployConfig()) is None


def test_a_cnn_without_held_out_data_gets_no_int8_variant_and_its_rollout_is_refused(
    tmp_path: Path,
) -> None:
    store, entry = _cnn_export(tmp_path, None)
    assert "int8" not in entry["variants"] and not store.file(1, "int8").exists()
    assert "calibration" in entry["skipped"]["int8"]
    # the fp32 model goes out as ever; the int8 one is refused with the reason, and recorded
    cfg = DeployConfig()
    assert deploy.refusal(store.info(1), "fp32", cfg) is None
    rollout = deploy.Rollout(None, None, None, "cnn_fmnist", store, cfg)  # refused: no broker
    refused = rollout.publish(1, "int8")
    assert not refused["promoted"] and "calibration" in refused["refused"]
    assert store.deployments()[-1]["refused"] == refused["refused"]
    with pytest.raises(FileNotFoundError):  # a version that was never exported is still missing
        rollout.publish(2, "int8")
