"""A failing round loop is never a success (aggregator/main.py): the service exits non-zero,
so systemd restarts it, and no model version that its checkpoint does not hold reaches the
fleet, neither as the global model nor as an ONNX export."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from aggregator import service
from aggregator.broadcast import ModelBroadcast
from aggregator.checkpoint import Checkpointer
from aggregator.deploy import store_for
from aggregator.main import EXIT_FAILED, run_service
from edgefl.data import save_npz

pytestmark = pytest.mark.broker

TARGETS = {
    "checkpoint": (Checkpointer, "save"),
    "publish": (ModelBroadcast, "publish"),
    "evaluation": (service, "evaluate"),
}


@pytest.mark.parametrize("where", sorted(TARGETS))
def test_a_failure_in_the_round_loop_exits_non_zero_and_nothing_unrecorded_escapes(
    make_fleet, tmp_path: Path, monkeypatch, caplog, where: str
) -> None:
    fleet = make_fleet(devices=2)
    agents = [fleet.start_agent(i) for i in range(2)]
    cfg = fleet.aggregator_config()
    cfg.rounds.rounds = 5
    save_npz(tmp_path / "test.npz", fleet.test)
    cfg.eval_data = str(tmp_path / "test.npz")

    owner, name = TARGETS[where]
    original = getattr(owner, name)
    calls: Counter[str] = Counter()

    def fail_on_third(*args, **kwargs):
        calls[where] += 1
        if calls[where] == 3:
            raise OSError(f"injected {where} failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, fail_on_third)
    with caplog.at_level(logging.CRITICAL, logger="aggregator.main"):
        code = run_service(cfg)
    assert code == EXIT_FAILED
    assert "the round loop failed" in caplog.text
    summary = json.loads((Path(cfg.state_dir) / "summary.json").read_text())
    assert summary["exit_code"] == EXIT_FAILED and f"injected {where} failure" in summary["error"]

    saved = Checkpointer(Path(cfg.state_dir) / "checkpoint.msgpack").load()
    assert saved is not None and 0 < saved["version"] < 5
    # the fleet holds no model newer than the checkpoint ...
    assert max(a.model_version for a in agents) <= saved["version"]
    # ... and nothing was exported or rolled out
    store = store_for(cfg.state_dir)
    assert store.versions() == [] and store.current() is None
    assert all(a.server.version is None for a in agents)

    # restarted (as systemd would), the service resumes from its checkpoint and finishes
    monkeypatch.setattr(owner, name, original)
    cfg.deploy.rollout = False
    assert run_service(cfg) == 0
    resumed = Checkpointer(Path(cfg.state_dir) / "checkpoint.msgpack").load()
    assert resumed["next_round"] == 6 and resumed["version"] == 5
