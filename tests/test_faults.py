"""Faults over the real broker: the broker restarting mid-round, devices vanishing, replays."""

from __future__ import annotations

import threading
import time

import numpy as np

from edgefl.compression import DenseCodec
from edgefl.messages import Update, encode_update
from tests.conftest import finite, wait_until
from tests.test_federation import Scripted


def _slow(agent, seconds: float) -> None:
    """Make the agent's training take ``seconds`` longer (wall time, like a slow device)."""
    train = agent._train_and_publish

    def slowly(task):
        time.sleep(seconds)
        train(task)

    agent._train_and_publish = slowly


def test_broker_restart_mid_round_both_sides_reconnect_and_the_round_completes(
    make_fleet,
) -> None:
    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i) for i in range(3)]
    for a in agents:
        _slow(a, 2.0)
    cfg = fleet.aggregator_config(rounds=1, deadline_s=30.0, quorum=1.0)
    with fleet.aggregator(cfg) as agg:
        runner = threading.Thread(target=agg.run, daemon=True)
        runner.start()
        wait_until(lambda: agg._round is not None, what="the round to open")
        time.sleep(0.5)  # the devices are training now
        fleet.broker.restart(down_s=1.0)
        runner.join(30)
        assert not runner.is_alive()
    (m,) = agg.history
    assert m.reported == 3 and m.applied and m.closed_by == "all_reported"
    assert all(a.link.connects >= 2 for a in agents)
    assert agg.link.connects >= 2


def test_a_third_of_the_fleet_vanishes_mid_round_and_the_round_closes_with_quorum(
    make_fleet,
) -> None:
    fleet = make_fleet(devices=10)
    agents = [fleet.start_agent(i) for i in range(10)]
    for victim in agents[:3]:
        victim._train_and_publish = lambda task, v=victim: v.crash()
    cfg = fleet.aggregator_config(rounds=2, deadline_s=5.0, quorum=0.6)
    with fleet.aggregator(cfg) as agg:
        before = {k: v.copy() for k, v in agg.weights.items()}
        started = time.monotonic()
        first = agg.run(rounds=1)[0]
        took = time.monotonic() - started
        second = agg.run(rounds=2)[1]
    assert first.reported == 7 and first.applied
    assert sorted(first.missing) == ["dev-0", "dev-1", "dev-2"]
    assert took <= cfg.rounds.deadline_s + 1.0
    assert any(not np.array_equal(before[k], agg.weights[k]) for k in before)
    # the vanished devices are offline and left out of the next round
    assert second.participants == 7 and second.reported == 7
    assert finite(agg.weights)


def test_a_replayed_update_from_an_earlier_round_is_rejected_as_stale(make_fleet, broker) -> None:
    fleet = make_fleet(devices=1)
    agg = fleet.aggregator(fleet.aggregator_config(rounds=2, deadline_s=10.0, min_devices=1))
    agg.start()
    a = Scripted(broker, "dev-a")
    runner = threading.Thread(target=agg.run, daemon=True)
    runner.start()
    try:
        rng = np.random.default_rng(0)
        delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in agg.spec.items()}
        first_task = a.tasks.get(timeout=10)
        first = encode_update(
            Update("dev-a", first_task.round, first_task.base_version, 10, delta), DenseCodec()
        )
        a.send(first)
        second_task = a.tasks.get(timeout=10)
        a.send(first)  # the round-1 update again, in round 2
        a.send(
            encode_update(
                Update("dev-a", second_task.round, second_task.base_version, 10, delta),
                DenseCodec(),
            )
        )
        runner.join(20)
        assert not runner.is_alive()
    finally:
        agg.stop()
        a.link.stop()
    assert [m.reported for m in agg.history] == [1, 1]
    assert agg.rejected["round"] == 1
    assert agg.history[1].rejected == {"round": 1}


def test_a_device_that_dies_mid_training_comes_back_with_its_state(make_fleet, caplog) -> None:
    import logging

    from edgefl.error_feedback import FILE_NAME, ErrorFeedback
    from tests.test_compression_fleet import compressed_config

    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i) for i in range(3)]
    cfg = compressed_config(fleet, rounds=3)
    cfg.rounds.offline_grace_s = 1.0
    state = fleet.tmp / "devices" / "dev-1" / FILE_NAME
    with fleet.aggregator(cfg) as agg:
        agg.run(rounds=1)
        saved = ErrorFeedback(state, agg.spec).state
        assert saved is not None and saved.round == 1  # the residual of its round-1 update
        victim = agents[1]
        # in round 2 it loses power while training
        victim._train_and_publish = lambda task: (time.sleep(0.2), victim.crash())
        second = agg.run(rounds=2)[1]
        assert second.reported == 2 and second.missing == ["dev-1"]
        with caplog.at_level(logging.INFO, logger="edgefl.error_feedback"):
            back = fleet.start_agent(1)  # the same device starting again: same state_dir
            wait_until(lambda: back.model_version == agg.version, what="the model after restart")
            third = agg.run(rounds=3)[2]
        assert "error feedback restored" in caplog.text
    assert third.reported == 3 and third.applied
    assert back.encoder.feedback.state.round == 3  # round 1's residual carried into round 3
