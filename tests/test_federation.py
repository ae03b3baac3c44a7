"""Federated training end to end over the private Mosquitto: real agents, a real aggregator,
one MQTT connection each."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from broker import PrivateBroker
from edgefl.compression import DenseCodec
from edgefl.messages import FORMAT_VERSION, Status, Task, Telemetry, Update, encode_compact_update
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics
from tests.conftest import FLEET, finite, wait_until

TOPICS = Topics(FLEET)


def test_small_federated_run_learns(make_fleet) -> None:
    fleet = make_fleet(devices=4)
    for i in range(4):
        fleet.start_agent(i)
    with fleet.aggregator(fleet.aggregator_config(rounds=5)) as agg:
        history = agg.run()
    assert [m.reported for m in history] == [4, 4, 4, 4, 4]
    assert all(m.applied for m in history)
    assert agg.version == 5
    # chance is 0.1; five rounds of FedAvg on label-skewed devices get far beyond it
    assert history[-1].accuracy > 0.7
    assert history[-1].accuracy > history[0].accuracy
    assert finite(agg.weights)
    assert sum(a.stats.updates_sent for a in fleet.agents.values()) == 20
    # where the aggregator's own time went, phase by phase, within each round's wall time
    phases = ["plan", "tasks", "wake", "aggregate", "bookkeeping", "optimiser", "evaluate",
              "metrics", "checkpoint", "publish_model", "status"]
    for m in history:
        assert list(m.phases) == phases
        assert all(v >= 0 for v in m.phases.values())
        assert sum(m.phases.values()) <= m.wall_s


def _retained_status(broker: PrivateBroker, device_id: str) -> Status:
    got: queue.Queue[bytes] = queue.Queue()
    monitor = MqttLink("test-monitor", broker.broker_config(broker.monitor), clean_start=True)
    monitor.subscribe(TOPICS.status(device_id), lambda _t, p: got.put(p))
    with monitor:
        return Status.from_payload(got.get(timeout=5))


def test_device_lost_mid_round_goes_offline_and_does_not_hold_the_round(make_fleet) -> None:
    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i) for i in range(3)]
    victim = agents[2]
    # it dies the moment its work starts, as if the power went
    victim._train_and_publish = lambda task: victim.crash()
    cfg = fleet.aggregator_config(rounds=1, deadline_s=30.0, quorum=0.5)
    with fleet.aggregator(cfg) as agg:
        started = time.monotonic()
        (m,) = agg.run()
        took = time.monotonic() - started
        assert not agg.registry.is_online("dev-2")
    assert m.reported == 2 and m.missing == ["dev-2"]
    assert m.applied and m.closed_by == "no_one_left"
    assert took < 10.0, "the round waited for a device that is gone"
    assert _retained_status(fleet.broker, "dev-2").state == "offline"


def test_silent_device_is_left_behind_at_the_deadline(make_fleet) -> None:
    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i) for i in range(3)]
    agents[1]._train_and_publish = lambda task: None  # connected, but never answers
    cfg = fleet.aggregator_config(rounds=1, deadline_s=2.0, quorum=0.5)
    with fleet.aggregator(cfg) as agg:
        started = time.monotonic()
        (m,) = agg.run()
        took = time.monotonic() - started
        rec = agg.registry.get("dev-1")
    assert m.closed_by == "deadline" and m.applied
    assert m.missing == ["dev-1"]
    assert 2.0 <= took < 5.0
    assert rec is not None and rec.deadlines_missed == 1


def test_without_quorum_the_model_stays(make_fleet) -> None:
    fleet = make_fleet(devices=2)
    agents = [fleet.start_agent(i) for i in range(2)]
    agents[0]._train_and_publish = lambda task: None
    cfg = fleet.aggregator_config(rounds=1, deadline_s=1.5, quorum=1.0)
    with fleet.aggregator(cfg) as agg:
        before = {k: v.copy() for k, v in agg.weights.items()}
        (m,) = agg.run()
        assert not m.applied and m.reported == 1
        assert agg.version == 0
        for k in before:
            np.testing.assert_array_equal(agg.weights[k], before[k])


class Scripted:
    """A device under the test's control: real credentials and connection, scripted payloads."""

    def __init__(self, broker: PrivateBroker, device_id: str) -> None:
        self.id = device_id
        self.tasks: queue.Queue[Task] = queue.Queue()
        self.link = MqttLink(
            f"scripted-{device_id}",
            broker.broker_config(broker.device_account(device_id)),
            clean_start=True,
        )
        self.link.subscribe(
            TOPICS.task(device_id), lambda _t, p: self.tasks.put(Task.from_payload(p))
        )
        self.link.start()
        reading = Telemetry(cpu_percent=1.0, mem_available_mb=512.0, samples=30)
        self.send_to(
            TOPICS.status(device_id), Status("online", telemetry=reading).to_payload(), True
        )

    def send_to(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.link.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def send(self, payload: bytes) -> None:
        self.send_to(TOPICS.update(self.id), payload)


def _update(device: str, task: Task, delta: dict, n: int, **changes) -> bytes:
    fields = dict(
        device_id=device,
        round=task.round,
        base_version=task.base_version,
        num_samples=n,
        delta=delta,
    )
    fields.update(changes)
    spec = {k: v.shape for k, v in delta.items()}
    return encode_compact_update(Update(**fields), DenseCodec(), spec)


def test_hostile_updates_are_rejected_counted_and_never_reach_the_model(
    make_fleet, broker: PrivateBroker
) -> None:
    fleet = make_fleet(devices=2)
    agg = fleet.aggregator(fleet.aggregator_config(rounds=1, deadline_s=20.0))
    agg.start()
    a, b = Scripted(broker, "dev-a"), Scripted(broker, "dev-b")
    runner = threading.Thread(target=agg.run, daemon=True)
    runner.start()
    try:
        task_a, task_b = a.tasks.get(timeout=10), b.tasks.get(timeout=10)
        w0 = {k: v.copy() for k, v in agg.weights.items()}
        rng = np.random.default_rng(0)
        delta_a = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in agg.spec.items()}
        delta_b = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in agg.spec.items()}
        valid_a = _update("dev-a", task_a, delta_a, 30)

        a.send(b"\x00" + bytes(rng.integers(0, 256, 600, dtype=np.uint8)))  # random bytes
        a.send(valid_a[: len(valid_a) // 2])  # truncated
        bad_shape = DenseCodec().encode(delta_a)
        bad_shape[0]["shape"] = [64, 128]  # the model's first tensor is 128 x 64
        a.send(
            encode_compact_update(
                Update("dev-a", task_a.round, task_a.base_version, 30, delta_a),
                DenseCodec(),
                agg.spec,
                bad_shape,
            )
        )
        nan = {k: v.copy() for k, v in delta_a.items()}
        next(iter(nan.values()))[0, 0] = np.nan
        a.send(_update("dev-a", task_a, nan, 30))
        a.send(_update("dev-a", task_a, delta_a, 30, round=task_a.round + 7))
        a.send(_update("dev-b", task_a, delta_a, 30))  # claims to be dev-b on dev-a's topic
        a.send(valid_a)
        a.send(valid_a)  # delivered twice: folded in once
        b.send(_update("dev-b", task_b, delta_b, 50))
        runner.join(20)
        assert not runner.is_alive()
    finally:
        agg.stop()
        a.link.stop()
        b.link.stop()

    assert dict(agg.rejected) == {
        "malformed": 2,
        "shape": 1,
        "nonfinite": 1,
        "round": 1,
        "device_mismatch": 1,
        "duplicate": 1,
    }
    (m,) = agg.history
    assert m.reported == 2 and m.applied
    assert finite(agg.weights)
    for k in w0:
        expected = w0[k] + (30 * delta_a[k] + 50 * delta_b[k]) / 80
        np.testing.assert_allclose(agg.weights[k], expected, rtol=1e-5, atol=1e-7)


def test_agents_and_aggregator_reconnect_after_the_broker_restarts(make_fleet) -> None:
    fleet = make_fleet(devices=2)
    agents = [fleet.start_agent(i) for i in range(2)]
    cfg = fleet.aggregator_config(rounds=2)
    with fleet.aggregator(cfg) as agg:
        agg.run(rounds=1)
        fleet.broker.restart(down_s=1.0)
        wait_until(
            lambda: all(a.link.connects >= 2 and a.link.connected.is_set() for a in agents),
            timeout=15,
            what="agents to reconnect",
        )
        wait_until(lambda: agg.link.connects >= 2, timeout=15, what="the aggregator to reconnect")
        wait_until(lambda: len(agg.registry.online()) == 2, what="births after the restart")
        (m,) = agg.run(rounds=2)[1:]
    assert m.round == 2 and m.reported == 2 and m.applied


@pytest.mark.parametrize("bad", [b"", b"not json", b'{"v": %d, "round": -1}' % FORMAT_VERSION])
def test_malformed_tasks_are_ignored_by_the_agent(make_fleet, broker, bad) -> None:
    fleet = make_fleet(devices=1)
    agent = fleet.start_agent(0)
    sender = MqttLink("test-aggregator", broker.broker_config(broker.aggregator), clean_start=True)
    with sender:
        sender.publish(TOPICS.task("dev-0"), bad, qos=1).wait_for_publish(5)
        wait_until(lambda: sum(agent.stats.rejected.values()) == 1, what="the rejection")
    assert agent.stats.updates_sent == 0
    assert agent.link.handler_errors == 0
