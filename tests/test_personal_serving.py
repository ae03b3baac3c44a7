"""Serving a device's personalised model (device/personal/serving.py, device/deployment.py): the
export checked against PyTorch, the archive of global models, and over the real broker the
personal model served after a rollout, through a canary, over HTTP and ``edgefl predict``, rebuilt
after a rollback, kept when a new one fails its check, with requests in flight all answered."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from device.agent import DeviceAgent
from device.deployment import DeploymentClient
from device.http import serve_http
from device.inference import PERSONAL, InferenceServer, LocalModels
from device.personal.serving import (
    PARITY_TOLERANCE,
    GlobalArchive,
    PersonalModelError,
    build_personal_onnx,
)
from edgefl import onnx_export
from edgefl.compression import WireError
from edgefl.data import Dataset
from edgefl.messages import Deployment, Status
from edgefl.models import build_model, get_weights, set_weights
from edgefl.training import predict_logits, train_local
from launch.cli import main as cli
from tests import synthetic
from tests.conftest import wait_until

torch.set_num_threads(1)

MODEL = "mlp_digits"


def tuned(weights: dict[str, np.ndarray] | None, data: Dataset) -> dict[str, np.ndarray] | None:
    """A small personalisation for these tests: the global model fine-tuned on the device's own
    data (deterministic). None in, None out, as the agent's ``personal_model(None)``."""
    if weights is None:
        return None
    model = build_model(MODEL)
    set_weights(model, weights)
    train_local(model, data, epochs=2, batch_size=32, lr=0.1, seed=0)
    return get_weights(model)


def torch_logits(weights: dict[str, np.ndarray], X: np.ndarray, name: str = MODEL) -> np.ndarray:
    model = build_model(name)
    set_weights(model, weights)
    return predict_logits(model, X)


def corrupting(real):
    """onnx_bytes that exports a slightly different model than it was given (0.01 on one
    output's bias): what a broken exporter does, seen by the parity check alone."""

    def export(model, input_shape, metadata=None):
        wrong = build_model(MODEL)
        set_weights(wrong, get_weights(model))
        with torch.no_grad():
            wrong[-1].bias[0] += 0.01
        return real(wrong, input_shape, metadata)

    return export


# ---------------------------------------------------------------------------------------------
# no broker


@pytest.mark.parametrize("name", ["mlp_digits", "cnn_fmnist", "cnn_watch"])
def test_the_personal_onnx_served_equals_pytorch_within_1e_5(name: str, tmp_path: Path) -> None:
    data = Dataset(*synthetic_digits()) if name == MODEL else synthetic.for_model(name, 256)
    model = build_model(name, seed=0)
    train_local(model, data, epochs=2, batch_size=32, lr=0.3)
    weights = get_weights(model)
    body = build_personal_onnx(name, weights, data.X, metadata={"model_version": 3})
    # served the way a device serves it: from its store, by ONNX Runtime alone
    store = LocalModels(tmp_path)
    store.add("p", body)
    server = InferenceServer()
    server.load(store.path("p"), {"version": 3, "variant": PERSONAL})
    X = data.X if name == MODEL else synthetic.for_model(name, 300, seed=9).X
    diff = np.abs(server.logits(X) - torch_logits(weights, X, name)).max()
    assert diff <= PARITY_TOLERANCE, diff
    assert server.metadata["model_version"] == "3"


def synthetic_digits() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 400)
    X = (rng.random((400, 64)) * 4 + y[:, None]).astype(np.float32)
    return X, y.astype(np.int64)


def test_a_personal_model_that_fails_its_check_is_refused(monkeypatch) -> None:
    X, _ = synthetic_digits()
    weights = get_weights(build_model(MODEL, seed=0))
    wrong_shape = dict(weights, **{"2.weight": np.zeros((7, 128), np.float32)})
    with pytest.raises(PersonalModelError, match="do not fit"):
        build_personal_onnx(MODEL, wrong_shape, X)
    with pytest.raises(PersonalModelError, match="do not fit"):
        build_personal_onnx(MODEL, {k: v for k, v in weights.items() if k != "0.bias"}, X)
    nan = dict(weights, **{"2.bias": np.full(10, np.nan, np.float32)})
    with pytest.raises(PersonalModelError, match="differs from PyTorch"):
        build_personal_onnx(MODEL, nan, X)
    monkeypatch.setattr(onnx_export, "onnx_bytes", corrupting(onnx_export.onnx_bytes))
    with pytest.raises(PersonalModelError, match="differs from PyTorch by up to 0.01"):
        build_personal_onnx(MODEL, weights, X)
    # the check is the tolerance's doing: a looser one lets the same export through
    assert build_personal_onnx(MODEL, weights, X, tolerance=0.1)
    # without check inputs, random ones still catch it
    with pytest.raises(PersonalModelError):
        build_personal_onnx(MODEL, weights, None)


def test_the_global_archive_keeps_the_last_few_by_when_remembered(tmp_path: Path) -> None:
    archive = GlobalArchive(tmp_path / "globals", keep=3)
    weights = {f"{v}": {"0.weight": np.full((2, 3), v, np.float32)} for v in range(6)}
    for v in (5, 1, 2):  # an aggregator that was reset counts from 1 again
        archive.remember(v, weights[str(v)])
    got = archive.get(5)
    assert set(got) == {"0.weight"} and got["0.weight"].dtype == np.float32
    np.testing.assert_array_equal(got["0.weight"], weights["5"]["0.weight"])
    archive.remember(3, weights["3"])
    # v5 was remembered first: it goes, though its number is the highest
    assert archive.versions() == [1, 2, 3] and archive.get(5) is None
    archive.remember(1, weights["1"])  # remembered again: now the newest
    archive.remember(4, weights["4"])
    assert archive.versions() == [3, 1, 4]
    assert archive.get(0) is None  # never held
    # a restarted device finds the same archive; nothing half-written is left behind
    again = GlobalArchive(tmp_path / "globals", keep=3)
    assert again.versions() == [3, 1, 4]
    assert sorted(os.listdir(tmp_path / "globals")) == ["v1.npz", "v3.npz", "v4.npz"]
    with pytest.raises(ValueError):
        archive.remember(-1, weights["1"])
    with pytest.raises(ValueError):
        GlobalArchive(tmp_path, keep=0)


def test_the_global_archive_refuses_pickles_and_broken_files(tmp_path: Path) -> None:
    archive = GlobalArchive(tmp_path)
    np.savez(tmp_path / "v1.npz", w=np.array([{"a": 1}], dtype=object))  # a pickle inside
    (tmp_path / "v2.npz").write_bytes(b"not a zip")
    with zipfile.ZipFile(tmp_path / "v3.npz", "w") as z:
        z.writestr("w.npy", b"\x93NUMPY garbage")
    assert archive.get(1) is None and archive.get(2) is None and archive.get(3) is None


def test_a_status_says_whether_the_model_served_is_personal() -> None:
    sent = Status("online", serving=4, serving_seq=9, serving_variant=PERSONAL)
    assert Status.from_payload(sent.to_payload()).serving_variant == PERSONAL
    assert Status.from_payload(Status("online").to_payload()).serving_variant is None
    obj = json.loads(sent.to_payload())
    for bad in ("int4", 3, ["personal"]):
        with pytest.raises(WireError):
            Status.from_payload(json.dumps(obj | {"serving_variant": bad}).encode())


# ---------------------------------------------------------------------------------------------
# over the real broker


class PersonalDevice:
    """A device agent that serves its personal model: the wiring the agent gets, done here with
    this file's own personalisation (:func:`tuned`) and a global archive the test fills."""

    def __init__(self, fleet, index: int, *, check_inputs: bool = True) -> None:
        self.agent = agent = DeviceAgent(
            fleet.device_config(f"dev-{index}"), fleet.data[index], executor=fleet.executor
        )
        self.archive = GlobalArchive(Path(agent.cfg.state_dir) / "globals")
        self.asked: list[Deployment] = []
        self.judged: list[dict] = []  # what the health check was given to judge
        self.mode = "tuned"  # or "none", "wrong shape"
        agent.deployment = DeploymentClient(
            agent.link,
            agent.topics,
            agent.id,
            agent.cfg.model.name,
            Path(agent.cfg.state_dir) / "models",
            health=self._health,
            on_change=agent._publish_birth,
            personalise=self._personalise,
            check_inputs=agent.data.X if check_inputs else None,
        )
        agent.server = agent.deployment.server
        fleet.agents[agent.id] = agent
        agent.start()

    def _personalise(self, dep: Deployment) -> dict[str, np.ndarray] | None:
        self.asked.append(dep)
        weights = tuned(self.archive.get(dep.version), self.agent.data)
        if self.mode == "none":
            return None
        if self.mode == "wrong shape" and weights is not None:
            weights["2.weight"] = weights["2.weight"][:, :64]
        return weights

    def _health(self, server: InferenceServer) -> float:
        self.judged.append(dict(server.info))
        return self.agent._local_accuracy(server)

    def remember_global(self, version: int) -> None:
        """What the agent does with each global model it receives."""
        agent = self.agent
        wait_until(lambda: agent.model_version == version, what=f"{agent.id} holding v{version}")
        self.archive.remember(version, agent.global_model.weights)

    def personal(self, version: int) -> dict[str, np.ndarray]:
        return tuned(self.archive.get(version), self.agent.data)

    @property
    def info(self) -> dict:
        return self.agent.server.info


def _aggregator(fleet, rounds: int = 2, **deploy):
    cfg = fleet.aggregator_config(rounds=rounds)
    cfg.deploy.rollout_timeout_s = 15.0
    cfg.deploy.canary_timeout_s = 10.0
    for k, v in deploy.items():
        setattr(cfg.deploy, k, v)
    return fleet.aggregator(cfg)


class Askers:
    """Clients of the device's HTTP endpoint asking all the time, as other programs on it do."""

    def __init__(self, url: str, X: np.ndarray, threads: int = 2) -> None:
        self.url, self.body = url, json.dumps({"inputs": X.tolist()}).encode()
        self.answers: list[dict] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ask) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _ask(self) -> None:
        while not self._stop.is_set():
            try:
                request = urllib.request.Request(f"{self.url}/predict", self.body)
                with urllib.request.urlopen(request, timeout=10) as r:
                    self.answers.append(json.loads(r.read()))
            except BaseException as e:  # noqa: BLE001 - any failure is what we look for
                self.errors.append(e)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def test_a_device_serves_its_personal_model_and_a_rollback_rebuilds_it(
    make_fleet, digits, capsys, tmp_path
) -> None:
    _, test = digits
    X = test.X[:100]
    fleet = make_fleet(devices=2)
    # dev-0 is personal, and the canary (the first online device by name)
    device = PersonalDevice(fleet, 0)
    fleet.start_agent(1)
    httpd = serve_http(device.agent.server, port=0)
    url = f"http://127.0.0.1:{httpd.server_port}"
    askers = None
    try:
        with _aggregator(fleet) as agg:
            agg.run()
            v1 = agg.version
            device.remember_global(v1)
            first = agg.deploy(agg.export())
            # the rollout waited for the personal device too: its status names the deployment
            assert first["promoted"] and first["devices_serving"] == 2
            assert device.info["variant"] == PERSONAL and device.info["version"] == v1
            assert device.info["base_sha256"] == first["sha256"] != device.info["sha256"]
            assert device.agent.deployment.serving_variant == PERSONAL
            assert [d.seq for d in device.asked] == [first["seq"]]
            # the personal model served is the device's PyTorch model, within 1e-5
            personal_v1 = device.personal(v1)
            served = device.agent.server.logits(test.X)
            assert np.abs(served - torch_logits(personal_v1, test.X)).max() <= 1e-5
            fleet_v1 = fleet.agents["dev-1"].server.predict(test.X)
            assert not np.array_equal(served.argmax(1), fleet_v1)  # personal, not the fleet's
            # HTTP and `edgefl predict` on the device's state dir answer from it
            with urllib.request.urlopen(f"{url}/health") as r:
                assert json.loads(r.read())["variant"] == PERSONAL
            np.savez(tmp_path / "x.npz", X=X)
            models = Path(device.agent.cfg.state_dir) / "models"
            assert (
                cli(["predict", "--model-dir", str(models), "--json", str(tmp_path / "x.npz")]) == 0
            )
            printed = json.loads(capsys.readouterr().out)
            assert printed["variant"] == PERSONAL and printed["version"] == v1
            assert printed["classes"] == served[:100].argmax(1).tolist()

            askers = Askers(url, X)
            agg.run(rounds=4)
            v2 = agg.version
            device.remember_global(v2)
            # through a canary: the personal device tries v2 first, and its health check
            # judges the personal model it would serve
            second = agg.rollout.publish(agg.export()["version"], canary_fraction=0.5)
            assert second["canary"]["devices"] == ["dev-0"] and second["canary"]["healthy"]
            assert second["promoted"] and second["devices_serving"] == 2
            canary_seq = second["canary"]["seq"]
            judged = [j for j in device.judged if j["seq"] == canary_seq]
            assert judged and judged[0]["variant"] == PERSONAL and judged[0]["version"] == v2
            assert [d.seq for d in device.asked[1:]] == [canary_seq, second["seq"]]
            assert device.info["version"] == v2 and device.info["seq"] == second["seq"]

            # a rollback to v1: the device rebuilds its personal model on v1, from its archive
            back = agg.rollout.rollback()
            assert back["version"] == v1 and back["devices_serving"] == 2
            assert device.asked[-1].version == v1 and device.asked[-1].seq == back["seq"]
            assert device.info["variant"] == PERSONAL and device.info["version"] == v1
            assert device.info["seq"] == back["seq"]
            served = device.agent.server.logits(test.X)
            assert np.abs(served - torch_logits(personal_v1, test.X)).max() <= 1e-5
            askers.stop()
    finally:
        if askers is not None:
            askers.stop()
        httpd.shutdown()
    # every request during the swaps was answered, by the model its reply names
    assert not askers.errors, askers.errors[:3]
    expected = {v: torch_logits(device.personal(v), X).argmax(1).tolist() for v in (v1, v2)}
    assert {a["variant"] for a in askers.answers} == {PERSONAL}
    # asked before, between and after both swaps: v1, then v2, then v1 again
    versions = [a["version"] for a in askers.answers]
    changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert changes[0] == v1 and v2 in changes and changes[-1] == v1, changes[:10]
    assert all(a["classes"] == expected[a["version"]] for a in askers.answers)
    assert device.agent.deployment.personal_failures == 0


def test_a_personal_model_that_fails_its_check_keeps_the_previous_one_served(
    make_fleet, monkeypatch, caplog
) -> None:
    fleet = make_fleet(devices=2)
    device = PersonalDevice(fleet, 0)
    fleet.start_agent(1)
    client = device.agent.deployment
    with _aggregator(fleet, rollout_timeout_s=2.0) as agg:
        agg.run()
        v1 = agg.version
        device.remember_global(v1)
        first = agg.deploy(agg.export())
        assert device.info["variant"] == PERSONAL and device.info["seq"] == first["seq"]
        kept = dict(device.info)

        # weights for another shape: not served, counted, the personal v1 model stays
        device.mode = "wrong shape"
        agg.run(rounds=3)
        device.remember_global(agg.version)
        second = agg.deploy(agg.export())
        wait_until(lambda: client.personal_failures == 1, what="the failure counted")
        assert second["devices_serving"] == 1  # the rollout sees dev-0 still on the first
        assert device.info == kept
        assert agg.registry.get("dev-0").serving_seq == first["seq"]

        # a corrupted export: the same
        device.mode = "tuned"
        monkeypatch.setattr(onnx_export, "onnx_bytes", corrupting(onnx_export.onnx_bytes))
        client.refresh_personal()
        wait_until(lambda: client.personal_failures == 2, what="the second failure counted")
        assert device.info == kept
        monkeypatch.undo()

        # personalisation off (no weights): the fleet's file, and why, said once
        device.mode = "none"
        with caplog.at_level(logging.DEBUG, logger="device.deployment"):
            client.refresh_personal()
            wait_until(lambda: device.info["seq"] == second["seq"], what="the fleet's v2")
            client.refresh_personal()
            wait_until(lambda: len(device.asked) == 5, what="asked again")
        assert device.info["variant"] == "fp32" and device.info["sha256"] == second["sha256"]
        said = [  # dev-1, not personalised, says so for itself
            r.levelno
            for r in caplog.records
            if r.getMessage().startswith("dev-0: serves the fleet's model")
        ]
        assert said[0] == logging.INFO and said.count(logging.INFO) == 1, said
        wait_until(lambda: agg.registry.get("dev-0").serving_seq == second["seq"], what="status")

        # personal weights again: the personal model on v2 replaces the fleet's file
        device.mode = "tuned"
        client.refresh_personal()
        wait_until(lambda: device.info["variant"] == PERSONAL, what="the personal v2 model")
        assert device.info["version"] == agg.version and device.info["seq"] == second["seq"]

        # the fleet goes int8: the personal model on it stays fp32, exact to its PyTorch model
        third = agg.rollout.publish(agg.version, "int8")
        assert third["promoted"] and third["devices_serving"] == 2
    assert device.info["variant"] == PERSONAL and device.info["precision"] == "fp32"
    assert device.info["base_variant"] == "int8" and device.info["base_sha256"] == third["sha256"]
    X = device.agent.data.X
    exact = torch_logits(device.personal(agg.version), X)
    assert np.abs(device.agent.server.logits(X) - exact).max() <= 1e-5
    assert client.personal_failures == 2


def test_a_serve_only_device_imports_no_torch_for_personal_serving() -> None:
    code = (
        "import sys, device.personal.serving, device.deployment; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60
    )
    assert out.returncode == 0, out.stderr
