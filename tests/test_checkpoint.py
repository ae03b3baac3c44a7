"""Checkpoints: atomic, checked, and a torn newest file falls back to the previous one."""

from __future__ import annotations

import numpy as np

from aggregator.checkpoint import Checkpointer


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
