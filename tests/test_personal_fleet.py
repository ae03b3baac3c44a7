"""Personalised models over the private Mosquitto: every method in a small real federation,
the personal layers of FedPer and FedRep never on the wire (the envelopes as they went over
MQTT), compressed updates and asynchronous mode with personal layers, and the personal state
across an agent's restart."""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path

import numpy as np
import pytest

from device.agent import DeviceAgent
from device.personal import METHODS
from device.personal.trainer import holdout_split
from edgefl.compression import DenseCodec, WireError
from edgefl.data import Dataset
from edgefl.messages import Update, decode_update, encode_compact_update
from edgefl.models import personal_keys, shared_spec
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics
from tests.conftest import FLEET, finite
from tests.test_federation import Scripted

TOPICS = Topics(FLEET)


def personal_config(fleet, method: str, **rounds):
    cfg = fleet.aggregator_config(**rounds)
    cfg.personal.method = method
    return cfg


def check_personal(m, devices: int) -> None:
    """A round's personal figures: one entry per reporting device, all within bounds."""
    p = m.personal
    assert p["personal_acc"]["n"] == p["global_acc"]["n"] == len(p["devices"]) == devices
    for figures in p["devices"].values():
        assert 0.0 <= figures["personal_acc"] <= 1.0 and 0.0 <= figures["global_acc"] <= 1.0
        assert figures["holdout_samples"] >= 1
    for key in ("personal_acc", "global_acc"):
        s = p[key]
        assert s["min"] <= s["p10"] <= s["mean"] <= 1.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_federates_and_reports_personal_and_global_accuracy(make_fleet, method):
    fleet = make_fleet(devices=3, alpha=0.1)
    agents = [fleet.start_agent(i) for i in range(3)]
    cfg = personal_config(fleet, method, rounds=3)
    with fleet.aggregator(cfg) as agg:
        history = agg.run()
    assert all(m.applied and m.reported == 3 for m in history)
    assert sum(agg.rejected.values()) == 0 and finite(agg.weights)
    for m in history:
        check_personal(m, 3)
    # devices train on their training split alone: the rounds' samples say so
    held = sum(len(holdout_split(a.data, 0.2, a.id)[1]) for a in agents)
    assert history[-1].samples == sum(len(a.data) for a in agents) - held
    assert history[-1].personal["personal_acc"]["mean"] > 0.3  # chance is 0.1
    lines = (Path(cfg.state_dir) / "rounds.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["personal"] == history[-1].personal
    for agent in agents:
        personal = agent.personal_model(agg.weights)
        assert personal is not None and set(personal) == set(agg.weights)
        assert all(personal[k].shape == agg.weights[k].shape for k in personal)


def _watch_updates(fleet) -> tuple[MqttLink, queue.Queue[tuple[str, bytes]]]:
    """What devices publish as updates, as the broker delivers it to a monitor."""
    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    monitor = MqttLink("test-monitor", fleet.broker.broker_config(fleet.broker.monitor),
                       clean_start=True)
    monitor.subscribe(TOPICS.all_devices("update"), lambda t, p: seen.put((t, p)))
    return monitor, seen


@pytest.mark.parametrize("method", ["fedper", "fedrep"])
def test_personal_layers_never_travel_and_an_update_holding_them_is_refused(make_fleet, method):
    fleet = make_fleet(devices=2, alpha=0.1)
    for i in range(2):
        fleet.start_agent(i)
    cfg = personal_config(fleet, method, rounds=2, min_devices=3, deadline_s=20.0)
    # compressed, with error feedback: it runs over the shared tensors alone
    for k, v in {"name": "topk", "fraction": 0.1, "bits": 8, "error_feedback": True}.items():
        setattr(cfg.codec, k, v)
    monitor, seen = _watch_updates(fleet)
    agg = fleet.aggregator(cfg)
    head = personal_keys(agg.spec, 1)
    initial = {k: agg.weights[k].copy() for k in head}
    with monitor, agg:
        scripted = Scripted(fleet.broker, "dev-x")
        runner = threading.Thread(target=agg.run, daemon=True)
        runner.start()
        try:
            t = scripted.tasks.get(timeout=10)
            assert t.personal["method"] == method
            rng = np.random.default_rng(0)
            whole = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in agg.spec.items()}
            bad = Update("dev-x", t.round, t.base_version, 30, whole)
            scripted.send(encode_compact_update(bad, DenseCodec(), agg.spec))
            shared = {k: v for k, v in whole.items() if k not in head}
            good = Update("dev-x", t.round, t.base_version, 30, shared)
            scripted.send(encode_compact_update(good, DenseCodec(), agg.update_spec))
            t2 = scripted.tasks.get(timeout=15)  # round 2: answer it too
            good2 = Update("dev-x", t2.round, t2.base_version, 30, shared)
            scripted.send(encode_compact_update(good2, DenseCodec(), agg.update_spec))
            runner.join(20)
            assert not runner.is_alive()
        finally:
            scripted.link.stop()
    assert agg.rejected["shape"] == 1  # the update holding the personal layers
    assert [m.reported for m in agg.history] == [3, 3]
    assert sum(agg.rejected.values()) == 1
    # on the wire: every update from the agents decodes over the shared tensors only ...
    shared_spec_ = shared_spec(agg.spec, 1)
    agents_sent = []
    while not seen.empty():
        topic, payload = seen.get()
        device = topic.split("/")[-2]
        if device == "dev-x":
            continue
        update = decode_update(payload, topic_device_id=device, spec=shared_spec_)
        assert set(update.delta) == set(shared_spec_) and not set(head) & set(update.delta)
        # ... and never passes for an update of the whole model
        with pytest.raises(WireError) as e:
            decode_update(payload, topic_device_id=device, spec=agg.spec)
        assert e.value.reason == "shape"
        agents_sent.append(update)
    assert len(agents_sent) == 4
    assert all(u.metrics["holdout_samples"] >= 1 for u in agents_sent)
    # the global model keeps its personal layers as initialised; the devices keep theirs
    for k in head:
        np.testing.assert_array_equal(agg.weights[k], initial[k])
    for agent in fleet.agents.values():
        assert agent.encoder.feedback.spec == shared_spec_
        personal = agent.personal_model(agg.weights)
        assert not all(np.array_equal(personal[k], agg.weights[k]) for k in head)


def test_asynchronous_mode_with_a_personal_method(make_fleet) -> None:
    fleet = make_fleet(devices=4, alpha=0.1)
    for i in range(4):
        fleet.start_agent(i)
    cfg = personal_config(fleet, "fedrep", mode="async", rounds=4, buffer_size=3, concurrency=4)
    with fleet.aggregator(cfg) as agg:
        head = {k: agg.weights[k].copy() for k in personal_keys(agg.spec, 1)}
        history = agg.run()
    assert [m.mode for m in history] == ["async"] * 4
    assert all(m.applied and m.reported == 3 for m in history)
    assert sum(agg.rejected.values()) == 0
    for m in history:
        devices = m.personal["devices"]
        assert 1 <= len(devices) <= 3 and m.personal["personal_acc"]["n"] == len(devices)
    assert all(np.array_equal(agg.weights[k], v) for k, v in head.items())


def test_the_personal_state_survives_a_restart_and_a_model_change_drops_it(
    make_fleet, caplog
) -> None:
    fleet = make_fleet(devices=2, alpha=0.1)
    agents = [fleet.start_agent(i) for i in range(2)]
    with fleet.aggregator(personal_config(fleet, "apfl", rounds=2)) as agg:
        agg.run()
        g = {k: v.copy() for k, v in agg.weights.items()}
    before = agents[0].personal_model(g)
    alpha = agents[0].trainer.personaliser._read()[1]["alpha"]
    agents[0].stop()
    # the same device, a new agent (a restart): its personal model is back before any task
    again = fleet.start_agent(0)
    assert again is not agents[0] and again.trainer.personaliser.method == "apfl"
    assert again.trainer.personaliser._read()[1]["alpha"] == alpha
    after = again.personal_model(g)
    assert all(np.array_equal(before[k], after[k]) for k in g)
    again.stop()
    # a new model on the same state directory: the state is dropped, and the log says why
    cfg = fleet.device_config("dev-0")
    cfg.model.name = "mlp_mnist"
    wide = Dataset(np.zeros((10, 784), np.float32), np.zeros(10, np.int64))
    with caplog.at_level(logging.WARNING, logger="device.personal.state"):
        changed = DeviceAgent(cfg, wide, executor=fleet.executor)
    assert changed.trainer.personaliser is None
    zeros = {k: np.zeros(s, np.float32) for k, s in changed.spec.items()}
    assert changed.personal_model(zeros) is None
    assert any("dropped: it is for another model shape" in r.getMessage() for r in caplog.records)


def test_a_personalised_fleet_serves_its_own_models_and_a_rollback_rebuilds_them(
    make_fleet, digits
) -> None:
    """The agent as shipped: after a rollout every device serves its personal model (exported
    on the device, equal to its PyTorch model within 1e-5, said in its birth), and a rollback
    rebuilds it on the older global model, which the device kept when that was deployed."""
    from tests.test_personal_serving import torch_logits

    _, test = digits
    fleet = make_fleet(devices=2, alpha=0.1)
    agents = [fleet.start_agent(i) for i in range(2)]
    cfg = personal_config(fleet, "fedrep", rounds=2)
    cfg.deploy.rollout_timeout_s = 15.0
    with fleet.aggregator(cfg) as agg:
        agg.run()
        v1, w1 = agg.version, {k: v.copy() for k, v in agg.weights.items()}
        first = agg.deploy(agg.export())
        assert first["promoted"] and first["devices_serving"] == 2

        def serves_personal_on(version: int, weights) -> None:
            for a in agents:
                info = a.server.info
                assert info["variant"] == "personal" and info["version"] == version
                assert a.deployment.serving_variant == "personal"
                expected = torch_logits(a.personal_model(weights), test.X)
                assert np.abs(a.server.logits(test.X) - expected).max() <= 1e-5

        serves_personal_on(v1, w1)
        # the two devices' personal heads differ: each serves its own model
        assert not np.array_equal(
            agents[0].server.logits(test.X), agents[1].server.logits(test.X)
        )
        agg.run(rounds=3)
        second = agg.deploy(agg.export())
        assert second["promoted"] and second["version"] > v1
        serves_personal_on(second["version"], agg.weights)
        back = agg.rollout.rollback()
        assert back["version"] == v1 and back["devices_serving"] == 2
        serves_personal_on(v1, w1)
        assert all(a.deployment.personal_failures == 0 for a in agents)
