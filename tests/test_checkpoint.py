"""Checkpoints: atomic, checked, and a torn newest file falls back to the previous one; an
aggregator resuming from one carries on with the same model, server optimiser and registry."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from aggregator.checkpoint import Checkpointer
from aggregator.rounds import Round
from aggregator.service import Aggregator
from aggregator.strategies import make_strategy
from edgefl.compression import DenseCodec
from edgefl.config import AggregatorConfig, BrokerConfig
from edgefl.messages import Status, Update, encode_compact_update


def _state(version: int) -> dict:
    return {
        "version": version,
        "weights": {"w": np.full((3, 2), version, np.float32)},
        "ledger": [{"round": r, "devices": ["a", "b"]} for r in range(version)],
    }


def test_round_trip_with_arrays(tmp_path) -> None:
    ck = Checkpointer(tmp_path / "c.msgpack")
    ck.save(_state(3))
    ck.wait_flushed()
    got = ck.load()
    assert got["version"] == 3 and got["ledger"][2] == {"round": 2, "devices": ["a", "b"]}
    np.testing.assert_array_equal(got["weights"]["w"], np.full((3, 2), 3, np.float32))
    assert got["weights"]["w"].dtype == np.float32


def test_a_torn_newest_checkpoint_falls_back_to_the_previous(tmp_path) -> None:
    path = tmp_path / "c.msgpack"
    ck = Checkpointer(path)
    ck.save(_state(1))
    ck.save(_state(2))
    ck.wait_flushed()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a power cut can leave
    assert Checkpointer(path).load()["version"] == 1
    path.write_bytes(b"")
    assert Checkpointer(path).load()["version"] == 1


def test_nothing_to_resume_from(tmp_path) -> None:
    assert Checkpointer(tmp_path / "none.msgpack").load() is None


def test_when_flushed_runs_after_the_flush_or_at_once(tmp_path) -> None:
    import threading

    from aggregator import checkpoint

    ck = Checkpointer(tmp_path / "ck.msgpack")
    gate = threading.Event()
    flushed: list[str] = []
    real_fsync = checkpoint.fsync_path

    def slow_fsync(path):
        gate.wait(5)
        real_fsync(path)
        flushed.append(str(path))

    calls: list[int] = []
    checkpoint.fsync_path = slow_fsync
    try:
        ck.save({"round": 1})
        ck.when_flushed(lambda: calls.append(len(flushed)))
        assert calls == []  # the disk has not got it yet: the broker must not forget anything
        gate.set()
        ck.wait_flushed()
    finally:
        checkpoint.fsync_path = real_fsync
    assert calls == [2]  # after the file and its folder were flushed
    ck.when_flushed(lambda: calls.append(-1))
    assert calls == [2, -1]  # nothing pending: at once


# -- an aggregator resuming from its checkpoint ---------------------------------------------------

DEVICES = ("dev-a", "dev-b")


def _aggregator(state_dir, strategy: str) -> Aggregator:
    cfg = AggregatorConfig(fleet="test", broker=BrokerConfig(port=1), state_dir=str(state_dir))
    cfg.strategy.name = strategy
    cfg.strategy.server_lr = 0.01 if strategy == "fedadam" else 1.0
    return Aggregator(cfg)  # never connected: rounds are driven through its intake by hand


def _round(agg: Aggregator, number: int) -> dict[str, np.ndarray]:
    """One round with both devices, through the aggregator's own intake and close; the deltas
    depend on the round number only, so two aggregators can be given the same round."""
    rnd = Round(number, agg.version, list(DEVICES), time.time() + 60, agg.spec)
    agg.registry.on_assigned(list(DEVICES))
    rng = np.random.default_rng(number)
    for i, device_id in enumerate(DEVICES):
        agg.registry.on_status(device_id, Status("online", "1.0", {"cores": 4 + i}))
        delta = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in agg.weights.items()}
        metrics = {"train_s": 0.5 + i, "steps": 10.0, "t_start": 0.0, "t_end": 0.5 + i}
        update = Update(device_id, number, agg.version, 40 + 20 * i, delta, metrics)
        payload = encode_compact_update(update, DenseCodec(), agg.spec)
        assert agg.intake.fold(f"edgefl/test/devices/{device_id}/update", payload, rnd)
    mean = rnd.aggregate()
    assert agg._wait_and_close(rnd, time.perf_counter(), 0, None).applied
    agg.checkpointer.wait_flushed()
    return mean


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_waiting_while_another_thread_saves(tmp_path, monkeypatch) -> None:
    """stop() waits for the flush from the main thread while the async engine may be saving: the
    wait must never see a flushing thread that has not started yet."""
    import threading

    from aggregator import checkpoint

    real_thread = threading.Thread
    starting, go_on = threading.Event(), threading.Event()

    class SlowStart(real_thread):
        def start(self) -> None:
            starting.set()
            go_on.wait(5)
            super().start()

    ck = Checkpointer(tmp_path / "ck.msgpack")
    ck.save({"round": 1})
    monkeypatch.setattr(checkpoint.threading, "Thread", SlowStart)
    saver = real_thread(target=ck.save, args=({"round": 2},))
    saver.start()
    assert starting.wait(5)
    ck.wait_flushed()  # the saver is between creating its flusher and starting it
    go_on.set()
    saver.join(5)
    ck.wait_flushed()
    assert ck.load() == {"round": 2}


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_server_optimiser_and_registry_survive_a_restart(tmp_path, strategy: str) -> None:
    running = _aggregator(tmp_path / "running", strategy)
    for number in (1, 2):
        _round(running, number)
    moments = running.strategy.state()  # FedAdam's m and v, FedAvgM's velocity
    assert moments and all(np.abs(a).max() > 0 for s in moments.values() for a in s.values())

    # a new aggregator on a copy of the state_dir, so that the two never write the same files
    shutil.copytree(tmp_path / "running", tmp_path / "resumed")
    resumed = _aggregator(tmp_path / "resumed", strategy)
    assert (resumed.version, resumed.next_round) == (2, 3)
    _same(resumed.weights, running.weights)
    for name, arrays in moments.items():
        _same(resumed.strategy.state()[name], arrays)
    by_id = sorted(running.registry.snapshot(), key=lambda r: r["device_id"])
    assert sorted(resumed.registry.snapshot(), key=lambda r: r["device_id"]) == by_id
    assert by_id[1]["rounds_completed"] == 2 and by_id[1]["capabilities"] == {"cores": 5}

    # the next round moves the resumed model exactly as it moves the one that never stopped
    before = {k: v.copy() for k, v in resumed.weights.items()}
    _round(running, 3)
    mean = _round(resumed, 3)
    _same(resumed.weights, running.weights)
    for name in moments:
        _same(resumed.strategy.state()[name], running.strategy.state()[name])
    # and that takes the moments: an optimiser that forgot them would step elsewhere
    forgetful = make_strategy(resumed.cfg.strategy).step(before, mean)
    assert any(not np.array_equal(forgetful[k], resumed.weights[k]) for k in before)
