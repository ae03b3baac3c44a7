"""The aggregator killed with SIGKILL in mid-round, then restarted: it takes the round up again,
and every update accepted before the kill is folded in exactly once (the broker redelivers the
ones not yet acknowledged, and acknowledgements wait for the checkpoint), whether updates come
whole or in chunks."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.checkpoint import Checkpointer
from broker import PrivateBroker
from edgefl.config import to_dict, to_toml
from edgefl.data import save_npz
from edgefl.messages import AggregatorStatus
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics
from tests.conftest import FLEET
from tests.test_faults import _slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=[None, 8192], ids=["whole", "chunked"])
def broker(request, tmp_path: Path) -> Iterator[PrivateBroker]:
    """conftest's broker, and one whose packet limit cuts every update into chunks (the
    manifest and the chunks of each are redelivered, and held, like one whole message)."""
    with PrivateBroker(FLEET, workdir=tmp_path / "broker", max_packet_size=request.param) as b:
        yield b


def _start(config: Path, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "--log-file",
        str(log),
        "aggregator",
        "--config",
        str(config),
        "--no-export",
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def test_aggregator_killed_mid_round_resumes_without_losing_or_double_counting(
    make_fleet, broker, tmp_path, digits
) -> None:
    fleet = make_fleet(devices=4)
    agents = [fleet.start_agent(i) for i in range(4)]
    for i, agent in enumerate(agents):
        _slow(agent, 0.6 * i)  # the round stays open while updates trickle in
    _, test = digits
    save_npz(tmp_path / "test.npz", test)
    cfg = fleet.aggregator_config(rounds=5, deadline_s=30.0)
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
            while True:  # until round 3 is open with two updates accepted
                st = seen.get(timeout=max(0.1, deadline - time.monotonic()))
                if st.round == 3 and st.expected == 4 and st.reported >= 2:
                    break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    accepted_before_kill = st.reported
    state_dir = Path(cfg.state_dir)
    assert Checkpointer(state_dir / "checkpoint.msgpack").load()["next_round"] == 3

    proc = _start(config, tmp_path / "second.log")
    assert proc.wait(90) == 0, (tmp_path / "second.log").read_text()[-3000:]

    rounds = [json.loads(line) for line in (state_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    third = rounds[2]
    assert accepted_before_kill >= 2
    assert third["reported"] == 4 and third["applied"], third
    ledger = Checkpointer(state_dir / "checkpoint.msgpack").load()["ledger"]
    assert [e["round"] for e in ledger] == [1, 2, 3, 4, 5]
    assert all(e["devices"] == ["dev-0", "dev-1", "dev-2", "dev-3"] for e in ledger)
    assert "taking up round 3 again" in (tmp_path / "second.log").read_text()

    # the same training without the kill ends at the same accuracy
    cfg.state_dir = str(tmp_path / "uninterrupted")
    with fleet.aggregator(cfg) as agg:
        clean = agg.run()
    assert abs(clean[-1].accuracy - rounds[-1]["accuracy"]) <= 0.01
    assert np.isfinite(rounds[-1]["accuracy"])
