"""launch/local.py: following the aggregator's round history while it is being written."""

from __future__ import annotations

import json
from pathlib import Path

from launch.local import _follow, _Progress


def test_a_half_written_last_line_waits_for_the_next_read(tmp_path: Path) -> None:
    path = tmp_path / "rounds.jsonl"
    first = json.dumps({"round": 1, "accuracy": 0.5})
    second = json.dumps({"round": 2, "accuracy": 0.6})
    path.write_text(first + "\n" + second[:20])  # the aggregator is mid-way through round 2
    rounds: list = []
    show = _Progress(2, enabled=False)
    seen = _follow(path, 0, rounds, show)
    assert [r["round"] for r in rounds] == [1] and seen == 1
    path.write_text(first + "\n" + second + "\n")
    seen = _follow(path, seen, rounds, show)
    assert [r["round"] for r in rounds] == [1, 2] and seen == 2
