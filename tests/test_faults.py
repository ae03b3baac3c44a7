"""Faults over the real broker: the broker restarting mid-round, devices vanishing, replays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edgefl.compression import DenseCodec
from edgefl.messages import Update, encode_compact_update
from tests.conftest import finite, wait_until
from tests.test_federation import Scripted

ROOT = Path(__file__).resolve().parent.parent


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
    # their Wills tell the aggregator they are gone, so it need not wait for the deadline;
    # either way the round is closed by then
    assert first.closed_by in ("no_one_left", "deadline"), first.closed_by
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
        first = encode_compact_update(
            Update("dev-a", first_task.round, first_task.base_version, 10, delta),
            DenseCodec(),
            agg.spec,
        )
        a.send(first)
        second_task = a.tasks.get(timeout=10)
        a.send(first)  # the round-1 update again, in round 2
        a.send(
            encode_compact_update(
                Update("dev-a", second_task.round, second_task.base_version, 10, delta),
                DenseCodec(),
                agg.spec,
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


def _device_process(config: Path, log: Path) -> subprocess.Popen:
    """The device agent as a deployment runs it: its own process (what systemd restarts)."""
    cmd = [sys.executable, "-m", "launch", "--log-file", str(log), "device", "--config"]
    cmd.append(str(config))
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def test_a_device_killed_mid_training_comes_back_with_its_state(make_fleet, tmp_path) -> None:
    from edgefl.config import ProfileConfig, to_dict, to_toml
    from edgefl.data import save_npz
    from edgefl.error_feedback import FILE_NAME, ErrorFeedback
    from tests.test_compression_fleet import compressed_config

    fleet = make_fleet(devices=3)
    fleet.start_agent(0)
    fleet.start_agent(2)
    # dev-1 runs in a process of its own, training at 1,000 samples/s so that a round's work
    # takes it about a second: long enough to be killed in the middle of it
    save_npz(tmp_path / "dev-1.npz", fleet.data[1])
    dev = fleet.device_config(
        "dev-1",
        data=str(tmp_path / "dev-1.npz"),
        profile=ProfileConfig(simulated=True, base_sps=1000.0),
    )
    config = tmp_path / "dev-1.toml"
    config.write_text(to_toml(to_dict(dev)))
    state = Path(dev.state_dir) / FILE_NAME
    cfg = compressed_config(fleet, rounds=3)
    cfg.train.epochs = 2
    cfg.rounds.offline_grace_s = 1.0
    proc = _device_process(config, tmp_path / "first.log")
    try:
        with fleet.aggregator(cfg) as agg:
            first = agg.run(rounds=1)[0]
            assert first.reported == 3
            saved = ErrorFeedback(state, agg.spec).state
            assert saved is not None and saved.round == 1  # the residual of its round-1 update
            models = sorted(p.name for p in Path(dev.state_dir).iterdir())

            result: list = []
            runner = threading.Thread(target=lambda: result.extend(agg.run(rounds=2)))
            runner.start()
            wait_until(lambda: agg._round is not None and agg._round.number == 2, what="round 2")
            time.sleep(0.4)  # its task has arrived; its training takes about a second
            assert "dev-1" not in agg._round.accepted, "dev-1 finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)  # a power cut in the middle of training
            proc.wait(10)
            runner.join(30)
            second = result[1]
            assert second.missing == ["dev-1"] and second.reported == 2 and second.applied
            # what it had saved is whole and still the round-1 residual
            assert ErrorFeedback(state, agg.spec).state.round == 1
            assert sorted(p.name for p in Path(dev.state_dir).iterdir()) == models

            proc = _device_process(config, tmp_path / "second.log")  # systemd starts it again
            third = agg.run(rounds=3)[2]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    log = (tmp_path / "second.log").read_text()
    assert "error feedback restored" in log, log[-2000:]
    assert third.reported == 3 and third.applied and "dev-1" not in third.missing
    # round 1's residual was carried into its round-3 update, which left a new one
    assert ErrorFeedback(state, agg.spec).state.round == 3
