"""aggregator/guard.py: what one device may cost the fleet, with a clock the test moves."""

from __future__ import annotations

import logging

import pytest

from aggregator.guard import Guard
from edgefl.config import QuarantineConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    clock = Clock()
    cut: list[tuple[str, str]] = []
    cfg = QuarantineConfig(rate_per_s=10.0, burst=20, max_invalid=3, window_s=60.0, hold_s=5.0,
                           log_interval_s=10.0)
    return Guard(cfg, lambda d, r: cut.append((d, r)), clock=clock), clock, cut


def test_a_burst_within_the_bucket_passes_and_one_more_is_cut_off(setup) -> None:
    guard, clock, cut = setup
    assert all(guard.admit("dev-a") for _ in range(20))
    assert cut == []
    assert not guard.admit("dev-a")  # the 21st at once
    assert [d for d, _ in cut] == ["dev-a"] and "messages above 10 per second" in cut[0][1]
    assert guard.admit("dev-b")  # its neighbour has a bucket of its own


def test_a_steady_rate_below_the_limit_is_never_cut_off(setup) -> None:
    guard, clock, cut = setup
    for _ in range(1000):  # 9 a second for ~110 s
        clock.now += 1 / 9
        assert guard.admit("dev-a")
    assert cut == []


def test_invalid_messages_quarantine_and_benign_ones_do_not(setup) -> None:
    guard, clock, cut = setup
    for _ in range(50):  # late and duplicate updates, old agents: an honest device's lot
        guard.reject("dev-a", "update", "round", "late")
        guard.reject("dev-a", "telemetry", "version", "format 1")
    assert cut == []
    for i in range(4):
        guard.reject("dev-b", "update", "malformed", f"junk {i}")
        clock.now += 1.0
    assert [d for d, _ in cut] == ["dev-b"]  # on the 4th (more than max_invalid)
    assert guard.rejected["update/malformed"] == 4 and guard.rejected["update/round"] == 50


def test_invalid_messages_spread_beyond_the_window_are_forgiven(setup) -> None:
    guard, clock, cut = setup
    for _ in range(10):
        guard.reject("dev-a", "status", "malformed", "junk")
        clock.now += 30.0  # at most 3 within any 60 s
    assert cut == []


def test_a_quarantined_device_is_dropped_for_the_hold_then_let_back(setup) -> None:
    guard, clock, cut = setup
    guard.quarantine("dev-a", "test")
    assert not guard.admit("dev-a") and not guard.admit("dev-a")
    assert guard.snapshot()["dev-a"]["dropped"] == 2
    clock.now += 6.0  # past hold_s: the broker let it in again
    assert guard.admit("dev-a")
    assert "dev-a" not in guard.quarantined
    assert guard.quarantines == 1


def test_rejections_are_logged_once_per_interval_with_counts(setup, caplog) -> None:
    guard, clock, _ = setup
    with caplog.at_level(logging.WARNING, logger="aggregator.guard"):
        for _ in range(100):
            guard.reject("dev-a", "update", "duplicate", "again")
        clock.now += 11.0
        guard.reject("dev-a", "update", "duplicate", "again")
        guard.flush_log()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # the first, then one summary line with what was held back
    assert "since the last such line: 99 update/duplicate" in lines[1]
