"""Deploying the global model as ONNX: export, chunked rollout over the real broker, canaries,
rollback, and serving on the device (ONNX Runtime only)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from aggregator.deploy import rollback_command
from device.http import serve_http
from device.inference import InferenceServer
from edgefl.models import set_weights
from edgefl.onnx_export import onnx_logits
from tests.conftest import wait_until

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
    # the command a user runs, with the aggregator's own config (here: while it is stopped)
    result = rollback_command(agg.cfg, None, None)
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
        "import sys; from edgefl.cli import main; "
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
