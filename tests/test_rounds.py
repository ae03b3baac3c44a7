"""aggregator/rounds.py folds into any accumulator (aggregator/aggregation.py), unaware of it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from aggregator.aggregation import Accumulator, Contribution
from aggregator.rounds import Duplicate, Round
from edgefl.messages import Update

SPEC = {"w": (2,)}


class Recording(Accumulator):
    """A new rule, as a staleness buffer or a masked sum would be: it sees every contribution
    and reports a figure of its own."""

    def __init__(self) -> None:
        self.seen: list[Contribution] = []

    @property
    def count(self) -> int:
        return len(self.seen)

    def fold(self, c: Contribution) -> None:
        self.seen.append(c)

    def mean(self) -> dict[str, np.ndarray]:
        return {"w": np.full(2, float(len(self.seen)), dtype=np.float32)}

    def figures(self) -> dict[str, float]:
        return {"effective_steps": 42.0}


def _update(device: str, steps: float) -> Update:
    return Update(device, 1, 0, 30, {"w": np.ones(2, np.float32)}, {"steps": steps})


def test_a_round_folds_contributions_into_any_accumulator() -> None:
    acc = Recording()
    rnd = Round(1, 0, ["a", "b"], time.time() + 5, SPEC, step_caps={"a": 4}, accumulator=acc)
    rnd.offer(_update("a", 100.0), 10)  # claims more steps than its task allowed
    rnd.offer(_update("b", 0.0), 10)  # fewer than one: counts as one
    assert [(c.device_id, c.steps, c.weight, c.base_version) for c in acc.seen] == [
        ("a", 4.0, 30.0, 0),
        ("b", 1.0, 30.0, 0),
    ]
    np.testing.assert_array_equal(rnd.aggregate()["w"], [2.0, 2.0])
    assert rnd.result("all_reported").effective_steps == 42.0


def test_an_empty_accumulator_aggregates_to_nothing() -> None:
    rnd = Round(1, 0, ["a"], time.time() + 5, SPEC, accumulator=Recording())
    assert rnd.aggregate() is None


def test_a_redelivered_copy_waits_for_the_rounds_checkpoint() -> None:
    """The copy the broker sends again after a dropped connection is acknowledged with the
    original, once the round's checkpoint is on the disk; after that, at once."""
    rnd = Round(1, 0, ["a"], time.time() + 5, SPEC, accumulator=Recording())
    acked: list[str] = []
    rnd.offer(_update("a", 1.0), 10)
    rnd.hold_ack(lambda: acked.append("a"))
    with pytest.raises(Duplicate) as dup:
        rnd.offer(_update("a", 1.0), 10)
    assert dup.value.hold is not None
    dup.value.hold(lambda: acked.append("a again"))
    assert acked == []
    assert rnd.release_acks() == 2 and acked == ["a", "a again"]
    rnd.hold_ack(lambda: acked.append("late"))
    assert acked[-1] == "late"
