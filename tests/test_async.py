"""Asynchronous mode (aggregator/asynchronous.py): the buffer (aggregator/buffer.py) on its own,
then real agents and aggregators over the private Mosquitto, and an aggregator killed with
SIGKILL."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from aggregator.aggregation import WeightedSum
from aggregator.asynchronous import JOURNAL
from aggregator.buffer import Buffer, OpenTask
from aggregator.checkpoint import Checkpointer
from aggregator.registry import DeviceRegistry
from aggregator.rounds import Duplicate, NotParticipant
from aggregator.staleness import Weighting
from edgefl.compression import WireError
from edgefl.config import to_dict, to_toml
from edgefl.data import save_npz
from edgefl.messages import AggregatorStatus, Update, decode_update
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics
from tests.conftest import FLEET, finite, wait_until
from tests.test_faults import _slow
from tests.test_scheduler import _device, _scheduler, sim

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"w": (2,)}


# -- the buffer on its own ----------------------------------------------------------------------


def _buffer(size: int = 3, max_staleness: int = 2, applies_to: int = 5) -> Buffer:
    return Buffer(
        size, max_staleness, Weighting("polynomial", 0.5), lambda: WeightedSum(SPEC),
        applies_to=applies_to, first_number=1,
    )


def _task(number: int, device: str, base: int = 5) -> OpenTask:
    return OpenTask(number, device, base, step_cap=10, sent_at=time.time(),
                    deadline=time.time() + 60)


def _update(device: str, task: int, base: int = 5, value: float = 1.0) -> Update:
    return Update(device, task, base, 10, {"w": np.full(2, value, np.float32)}, {"steps": 5.0})


def test_the_buffer_is_full_after_exactly_buffer_size_updates() -> None:
    buf = _buffer(size=3)
    buf.add([_task(n, f"d{n}") for n in range(1, 6)], 0, {})
    for n in (1, 2):
        buf.offer(_update(f"d{n}", n), 100)
    assert buf.take_ready() is None and buf.progress() == (1, 2, 3)
    buf.offer(_update("d3", 3), 100)
    assert buf.progress() == (2, 0, 3)  # the next update goes into buffer 2 at once
    buf.offer(_update("d4", 4), 100)
    full = buf.take_ready()
    assert full is not None and full.number == 1 and full.count == 3
    assert full.updates == [("d1", 1), ("d2", 2), ("d3", 3)]
    assert full.acc.aggregate()["w"] == pytest.approx([1.0, 1.0])
    assert buf.take_ready() is None and buf.progress() == (2, 1, 3)
    # buffer 2 joins the model buffer 1 makes: an update on v5 is one version stale there
    assert buf.current.acc.applies_to == 6 and buf.current.acc.staleness == {1: 1}


def test_an_update_staler_than_the_bound_is_rejected_and_its_task_ends() -> None:
    buf = _buffer(max_staleness=2, applies_to=5)
    buf.add([_task(1, "a", base=2), _task(2, "b", base=3)], 0, {})
    with pytest.raises(WireError) as e:
        buf.offer(_update("a", 1, base=2), 100)
    assert e.value.reason == "stale" and "3 versions" in e.value.detail
    assert 1 not in buf.tasks  # the device is free for work on the newest model
    buf.offer(_update("b", 2, base=3), 100)  # two versions: within the bound
    assert buf.current.acc.staleness == {2: 1}


def test_a_chunked_update_is_admitted_for_its_own_open_task_only() -> None:
    # what intake asks of the sink before a chunked update's chunks take any memory
    buf = _buffer()
    buf.add([_task(1, "a", base=5)], 0, {})
    assert buf.admits("a", 1, 5) is None and buf.is_open(1)
    assert buf.admits("b", 1, 5)[0] == "not_participant"
    assert buf.admits("a", 2, 5)[0] == "not_participant"
    assert buf.admits("a", 1, 4)[0] == "base_version"
    buf.offer(_update("a", 1), 100)
    assert not buf.is_open(1)  # answered: a partial of it would be dropped


def test_only_the_task_given_to_that_device_is_answered_and_only_once() -> None:
    buf = _buffer()
    buf.add([_task(1, "a"), _task(2, "b")], 0, {})
    with pytest.raises(NotParticipant):
        buf.offer(_update("b", 1), 100)  # task 1 is a's
    with pytest.raises(NotParticipant):
        buf.offer(_update("a", 9), 100)  # never given
    with pytest.raises(WireError) as e:
        buf.offer(_update("a", 1, base=4), 100)
    assert e.value.reason == "base_version"
    buf.offer(_update("a", 1), 100)
    with pytest.raises(Duplicate):
        buf.offer(_update("a", 1), 100)  # QoS 1 delivers at least once


def test_acks_wait_for_the_release_and_a_late_one_goes_out_at_once() -> None:
    buf = _buffer(size=1)
    buf.add([_task(1, "a"), _task(2, "b")], 0, {})
    acked: list[str] = []
    buf.offer(_update("a", 1), 100)
    buf.hold_ack(lambda: acked.append("a"))
    full = buf.take_ready()
    assert full is not None and acked == []
    assert buf.release(full) == 1 and acked == ["a"]
    buf.hold_ack(lambda: acked.append("late"))  # held after its buffer was released
    assert acked == ["a", "late"]


def test_a_redelivered_copy_is_acknowledged_with_the_original() -> None:
    """A dropped connection makes the broker send an unacknowledged update again: the copy is
    a duplicate, but its acknowledgement must wait for the original's checkpoint, or the
    broker would forget an update that no checkpoint holds."""
    buf = _buffer(size=2)
    buf.add([_task(1, "a"), _task(2, "b"), _task(3, "c")], 0, {})
    acked: list[str] = []
    buf.offer(_update("a", 1), 100)
    buf.hold_ack(lambda: acked.append("a"))
    with pytest.raises(Duplicate) as dup:
        buf.offer(_update("a", 1), 100)
    assert dup.value.hold is not None
    dup.value.hold(lambda: acked.append("a again"))
    assert acked == []  # neither goes out before the buffer's checkpoint
    buf.offer(_update("b", 2), 100)
    buf.hold_ack(lambda: acked.append("b"))
    full = buf.take_ready()
    assert full is not None and buf.release(full) == 3
    assert sorted(acked) == ["a", "a again", "b"]
    with pytest.raises(Duplicate) as dup:  # a copy after the release: intake acks it at once
        buf.offer(_update("a", 1), 100)
    assert dup.value.hold is None


def test_tasks_answered_but_not_yet_released_stay_in_the_saved_state() -> None:
    buf = _buffer(size=2)
    buf.add([_task(1, "a"), _task(2, "b"), _task(3, "c")], 0, {})
    buf.offer(_update("a", 1), 100)
    saved = {t["number"]: t for t in buf.state()["tasks"]}
    # a's update is in memory only: after a restart the broker redelivers it to this task
    assert set(saved) == {1, 2, 3} and saved[1]["active"] is False and saved[2]["active"]
    buf.offer(_update("b", 2), 100)
    full = buf.take_ready()
    assert full is not None
    buf.release(full)
    assert {t["number"] for t in buf.state()["tasks"]} == {3}
    restarted = _buffer(size=2)
    restarted.folded[("a", 1)] = 1  # from the checkpoint's ledger
    restarted.restore({"seq": 1, "next_task": 4, "tasks": list(saved.values())})
    assert set(restarted.tasks) == {2, 3} and restarted.next_task == 4
    assert all(t.restored for t in restarted.tasks.values())


def test_a_declined_device_is_held_back_and_replies_end_only_its_own_task() -> None:
    buf = _buffer()
    buf.add([_task(1, "a"), _task(2, "b")], 0, {})
    assert not buf.withdraw("a", "declined", 2)  # b's task
    assert not buf.withdraw("a", "declined", None)
    assert buf.withdraw("a", "declined", 1)
    assert "a" in buf.declined_at and 1 not in buf.tasks
    assert buf.withdraw("b", "late", 2)
    assert buf.current.missing == ["b"] and buf.take_missed() == ["b"]


# -- the scheduler's tasks in asynchronous mode -------------------------------------------------


def test_assign_numbers_tasks_for_idle_eligible_devices_least_worked_first() -> None:
    reg = DeviceRegistry()
    for i, sps in enumerate([1000.0, 500.0, 250.0]):
        _device(reg, f"d{i}", sps=sps)
    _device(reg, "low", sps=1000.0, battery=10.0)  # on battery under the 20 % floor
    reg.on_assigned(["d0"])  # d0 has worked more than d1
    sched = _scheduler(reg, budget_s=1.0, deadline_s=60.0, deadline_slack=0.5)
    before = time.time()
    got, _ = sched.assign(7, 3, slots=2, exclude={"d2"})
    assert [a.device_id for a in got] == ["d1", "d0"]
    assert [a.task.round for a in got] == [7, 8]
    assert all(a.task.base_version == 3 for a in got)
    # each task's own deadline: the adaptive budget x (1 + deadline_slack)
    assert all(before + 1.5 <= a.task.deadline <= time.time() + 1.5 for a in got)
    assert all(a.step_cap == a.workload.steps == a.task.max_steps for a in got)
    assert sched.assign(9, 3, slots=0, exclude=set())[0] == []
    everyone, _ = sched.assign(9, 3, slots=10, exclude=set())
    assert {a.device_id for a in everyone} == {"d0", "d1", "d2"}  # never "low"


def test_assign_with_uniform_workloads_gives_the_train_work_and_deadline_s() -> None:
    reg = DeviceRegistry()
    _device(reg, "a", samples=100)
    sched = _scheduler(reg, workload="uniform", deadline_s=5.0)
    before = time.time()
    (a,), _ = sched.assign(1, 0, slots=3, exclude=set())
    assert a.workload is None and a.task.max_steps == 0
    assert a.step_cap == 20  # 100 samples, batch 32: 4 steps an epoch, 5 epochs
    assert before + 5.0 <= a.task.deadline <= time.time() + 5.0


# -- over the broker ----------------------------------------------------------------------------


def async_config(fleet, **rounds):
    return fleet.aggregator_config(**{"mode": "async", **rounds})


def _ledger_pairs(agg) -> list[tuple[str, int]]:
    return [tuple(p) for e in agg.ledger for p in e["updates"]]


def test_async_rounds_publish_a_version_every_buffer_size_updates(make_fleet) -> None:
    fleet = make_fleet(devices=4)
    for i in range(4):
        fleet.start_agent(i)
    cfg = async_config(fleet, rounds=6, buffer_size=3, concurrency=3)
    with fleet.aggregator(cfg) as agg:
        history = agg.run()
    assert [m.round for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.model_version for m in history] == [1, 2, 3, 4, 5, 6]
    assert all(m.reported == 3 and m.mode == "async" and m.applied for m in history)
    assert all(len(e["updates"]) == 3 for e in agg.ledger)
    pairs = _ledger_pairs(agg)
    assert len(set(pairs)) == 18  # every (device, task) once
    assert {d for d, _ in pairs} == {"dev-0", "dev-1", "dev-2", "dev-3"}
    assert history[-1].accuracy > 0.7 and finite(agg.weights)
    assert sum(agg.rejected.values()) == 0
    assert all(sum(m.buffer["staleness"].values()) == 3 for m in history)
    lines = (Path(cfg.state_dir) / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["mode"] for line in lines] == ["async"] * 6
    journal = json.loads((Path(cfg.state_dir) / JOURNAL).read_text())
    assert journal["next_task"] > max(n for _, n in pairs)


def test_a_stale_update_is_rejected_counted_and_its_device_keeps_working(make_fleet) -> None:
    fleet = make_fleet(devices=4)
    agents = [fleet.start_agent(i) for i in range(4)]
    _slow(agents[3], 0.6)  # dev-3 finishes after the others have made new versions
    cfg = async_config(fleet, rounds=1000, buffer_size=2, concurrency=4, max_staleness=0)
    with fleet.aggregator(cfg) as agg:
        runner = threading.Thread(target=agg.run, daemon=True)
        runner.start()
        wait_until(
            lambda: agg.rejected["stale"] >= 1 and agents[3].stats.tasks_received >= 2,
            timeout=20,
            what="a stale update from dev-3, and its next task on the newest model",
        )
    runner.join(10)
    buf = agg.engine.buffer
    # counted once each: in the line of the buffer being filled when it came
    counted = [m.rejected.get("stale", 0) for m in agg.history]
    counted += [b.rejected["stale"] for b in (*buf.ready, buf.current)]
    assert sum(counted) == agg.rejected["stale"]
    assert all(d != "dev-3" for d, _ in _ledger_pairs(agg))
    assert "dev-3" not in agg.guard.quarantined  # an honest device's stale update is benign
    assert all(m.buffer["staleness"] == {"0": 2} for m in agg.history)


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_max_tasks_share_keeps_a_fast_device_from_filling_the_buffers(make_fleet, share):
    fleet = make_fleet(devices=4)
    agents = [fleet.start_agent(i) for i in range(4)]
    for agent in agents[1:]:
        _slow(agent, 0.4)  # dev-0 is several times faster than the rest
    cfg = async_config(fleet, rounds=4, buffer_size=4, concurrency=4, max_tasks_share=share)
    with fleet.aggregator(cfg) as agg:
        agg.run()
    most = max(max(Counter(d for d, _ in e["updates"]).values()) for e in agg.ledger)
    if share == 0.25:
        assert most == 1  # one update per device and buffer: the others were working
    else:
        assert most >= 2


def test_max_tasks_share_never_stalls_a_fleet_smaller_than_the_buffer(make_fleet) -> None:
    fleet = make_fleet(devices=2)
    for i in range(2):
        fleet.start_agent(i)
    cfg = async_config(fleet, rounds=3, buffer_size=4, max_tasks_share=0.25, deadline_s=20.0)
    with fleet.aggregator(cfg) as agg:
        history = agg.run()
    assert [m.reported for m in history] == [4, 4, 4]


def test_adaptive_workloads_and_fednova_in_async_mode(make_fleet) -> None:
    fleet = make_fleet(devices=3)
    for i in range(3):
        fleet.start_agent(i)
    cfg = async_config(fleet, rounds=6, buffer_size=3)
    cfg.schedule.workload = "adaptive"
    cfg.schedule.probe_epochs = 1
    cfg.strategy.fednova = True
    with fleet.aggregator(cfg) as agg:
        history = agg.run()
    assert all(m.reported == 3 and m.effective_steps for m in history)
    assert any(m.workloads for m in history)
    assert history[-1].accuracy > 0.5 and finite(agg.weights)


def test_a_device_that_declines_waits_for_its_next_telemetry(make_fleet) -> None:
    fleet = make_fleet(devices=3)
    # the aggregator's floor is 20 %, so dev-0 at 50 % looks fine to it; dev-0 keeps its own
    # floor at 60 % and declines whatever it is given
    decliner = fleet.start_agent(
        0, profile=sim(battery_pct=50.0), battery_floor_pct=60.0, telemetry_interval_s=0.5
    )
    for i in (1, 2):
        fleet.start_agent(i)
    cfg = async_config(fleet, rounds=1000, buffer_size=2)
    with fleet.aggregator(cfg) as agg:
        threading.Thread(target=agg.run, daemon=True).start()
        time.sleep(2.0)
        declined = agg.registry.get("dev-0").declines
        asked = decliner.stats.tasks_received
    assert declined >= 2 and asked >= 2  # asked again once its telemetry was newer ...
    assert asked <= 2.0 / 0.5 + 2  # ... and not in a loop as fast as it can decline
    assert agg.history and all(d != "dev-0" for d, _ in _ledger_pairs(agg))
    assert decliner.hardware.battery()[0] == 50.0  # it did no work


def test_topk_updates_and_a_robust_rule_work_in_async_mode(make_fleet) -> None:
    fleet = make_fleet(devices=4)
    for i in range(4):
        fleet.start_agent(i)
    cfg = async_config(fleet, rounds=8, buffer_size=3, concurrency=4, staleness="hinge")
    for k, v in {"name": "topk", "fraction": 0.05, "bits": 4, "downlink": "delta"}.items():
        setattr(cfg.codec, k, v)
    cfg.strategy.aggregation = "trimmed_mean"
    cfg.strategy.trim_fraction = 0.34  # one of three per coordinate, each side
    with fleet.aggregator(cfg) as agg:
        history = agg.run()
    assert all(m.reported == 3 for m in history)
    assert sum(agg.rejected.values()) == 0
    assert history[-1].accuracy > 0.5 and finite(agg.weights)
    per_update = sum(m.uplink_bytes for m in history) / sum(m.reported for m in history)
    assert per_update < 38_000 / 10  # compressed: a dense update is about 38 KB


def test_a_device_that_restarts_mid_task_rejoins(make_fleet) -> None:
    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i) for i in range(3)]
    _slow(agents[2], 30.0)  # dev-2 will not finish its first task before it restarts
    cfg = async_config(fleet, rounds=1000, buffer_size=2, concurrency=3, deadline_s=60.0)
    with fleet.aggregator(cfg) as agg:
        runner = threading.Thread(target=agg.run, daemon=True)
        runner.start()
        buf = agg.engine.buffer
        wait_until(
            lambda: any(t.device_id == "dev-2" for t in buf.active()), what="a task for dev-2"
        )
        (first,) = [t.number for t in buf.active() if t.device_id == "dev-2"]
        time.sleep(0.2)
        agents[2].crash()  # no goodbye: its Last Will says offline
        fleet.start_agent(2)  # the same device again (same state directory)
        wait_until(
            lambda: any(d == "dev-2" and n > first for d, n in _ledger_pairs(agg)),
            timeout=20,
            what="an update from the restarted dev-2 in an applied buffer",
        )
        # the lost task was given up before that, in a buffer applied no later
        wait_until(lambda: any("dev-2" in m.missing for m in agg.history), what="its line")
    assert ("dev-2", first) not in _ledger_pairs(agg)


def _start(config: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch", "--log-file", str(log), "aggregator", "--config",
           str(config), "--no-export"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _record_updates(agent, sent: list[tuple[str, int]]) -> None:
    """Note (device, task) of every update the agent publishes."""
    publish = agent.link.publish
    topic = agent.topics.update(agent.id)

    def recording(t, payload, *args, **kwargs):
        if t == topic:
            update = decode_update(payload, topic_device_id=agent.id, spec=agent.spec)
            sent.append((agent.id, update.round))
        return publish(t, payload, *args, **kwargs)

    agent.link.publish = recording


@pytest.mark.slow
def test_aggregator_killed_in_async_mode_loses_and_duplicates_nothing(
    make_fleet, broker, tmp_path, digits
) -> None:
    fleet = make_fleet(devices=4)
    agents = [fleet.start_agent(i) for i in range(4)]
    sent: list[tuple[str, int]] = []
    for i, agent in enumerate(agents):
        _slow(agent, 0.15 + 0.15 * i)
        _record_updates(agent, sent)
    _, test = digits
    save_npz(tmp_path / "test.npz", test)
    cfg = async_config(
        fleet, rounds=8, buffer_size=4, concurrency=4, deadline_s=30.0, max_staleness=100
    )
    cfg.eval_data = str(tmp_path / "test.npz")
    config = tmp_path / "aggregator.toml"
    config.write_text(to_toml(to_dict(cfg)))

    seen: queue.Queue[AggregatorStatus] = queue.Queue()
    monitor = MqttLink("test-monitor", broker.broker_config(broker.monitor), clean_start=True)
    monitor.subscribe(
        Topics(FLEET).aggregator_status, lambda _t, p: seen.put(AggregatorStatus.from_payload(p))
    )
    with monitor:
        proc = _start(config, tmp_path / "first.log")
        try:
            deadline = time.monotonic() + 60
            while True:  # until buffer 3 holds two updates, their acknowledgements held
                st = seen.get(timeout=max(0.1, deadline - time.monotonic()))
                if st.round == 3 and st.reported >= 2:
                    break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    before_kill = list(sent)
    state_dir = Path(cfg.state_dir)
    assert Checkpointer(state_dir / "checkpoint.msgpack").load()["next_round"] == 3

    proc = _start(config, tmp_path / "second.log")
    assert proc.wait(90) == 0, (tmp_path / "second.log").read_text()[-3000:]

    ledger = Checkpointer(state_dir / "checkpoint.msgpack").load()["ledger"]
    assert [e["round"] for e in ledger] == list(range(1, 9))
    assert all(len(e["updates"]) == 4 for e in ledger)
    pairs = [tuple(p) for e in ledger for p in e["updates"]]
    assert len(pairs) == len(set(pairs)), "an update was folded in twice"
    # every update a device sent before the kill is in the model: those the first aggregator
    # had folded into buffer 3 were redelivered (not acknowledged), the rest were queued
    assert len(before_kill) >= 10
    assert set(before_kill) <= set(pairs), set(before_kill) - set(pairs)
    rounds = [json.loads(line) for line in (state_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, 9))
    assert rounds[-1]["model_version"] == 8 and np.isfinite(rounds[-1]["accuracy"])
    assert "taking up" in (tmp_path / "second.log").read_text()


@pytest.mark.slow
def test_the_local_launcher_runs_async_mode_to_an_onnx_rollout(tmp_path) -> None:
    from edgefl.config import RunConfig, from_dict
    from launch.local import run_local

    cfg = from_dict(
        RunConfig,
        {
            "fleet": "asyncdemo",
            "rounds": {"mode": "async", "rounds": 6, "buffer_size": 3},
            "demo": {"devices": 4, "device_processes": 1, "solo_device": False,
                     "telemetry_interval_s": 1.0},
        },
    )
    result = run_local(cfg, tmp_path / "run", timeout_s=300)
    assert result.ok, result.error
    rounds = result.metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert all(r["mode"] == "async" and r["reported"] == 3 for r in rounds)
    assert result.metrics["onnx"]["version"] == 6
    assert result.metrics["deployment"]["promoted"]
    assert result.metrics["deployment"]["devices_serving"] == 4
