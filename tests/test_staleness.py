"""Staleness weightings and the staleness-weighted accumulator (aggregator/staleness.py), and
the [rounds] keys of asynchronous mode."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.aggregation import Contribution, WeightedSum
from aggregator.robust import CoordinateMedian
from aggregator.staleness import StalenessWeighted, Weighting
from aggregator.strategies.fednova import NormalisedSum
from edgefl.config import AggregatorConfig, ConfigError, RoundsConfig, from_dict

SPEC = {"w": (2,)}


def test_constant_weighting_ignores_staleness() -> None:
    w = Weighting("constant")
    assert [w(s) for s in (0, 1, 7, 100)] == [1.0, 1.0, 1.0, 1.0]


def test_polynomial_weighting_is_one_over_a_power_of_one_plus_staleness() -> None:
    assert Weighting("polynomial", exponent=0.5)(3) == pytest.approx(0.5)
    assert Weighting("polynomial", exponent=0.5)(0) == 1.0
    assert Weighting("polynomial", exponent=1.0)(4) == pytest.approx(0.2)
    assert Weighting("polynomial", exponent=2.0)(1) == pytest.approx(0.25)


def test_hinge_weighting_is_flat_up_to_its_grace_then_falls() -> None:
    w = Weighting("hinge", hinge_slope=10.0, hinge_grace=4)
    assert [w(s) for s in range(5)] == [1.0] * 5
    assert w(5) == pytest.approx(1 / 11)
    assert w(6) == pytest.approx(1 / 21)
    assert Weighting("hinge", hinge_slope=0.5, hinge_grace=0)(2) == pytest.approx(0.5)


def test_weighting_from_config() -> None:
    rc = RoundsConfig(staleness="hinge", hinge_slope=2.0, hinge_grace=1)
    assert Weighting.from_config(rc)(2) == pytest.approx(1 / 3)
    assert Weighting.from_config(RoundsConfig())(8) == pytest.approx(1 / 3)  # (1 + 8)^-0.5


def _c(device: str, delta: float, base: int, weight: float = 1.0, steps: float = 1.0):
    return Contribution(device, {"w": np.full(2, delta, np.float32)}, weight, steps, base)


def test_the_weight_scales_the_delta_not_the_sample_weight() -> None:
    acc = StalenessWeighted(WeightedSum(SPEC), Weighting("polynomial", 0.5), applies_to=10)
    acc.fold(_c("a", 1.0, base=10, weight=1.0))  # fresh: weight 1
    acc.fold(_c("b", 1.0, base=7, weight=3.0))  # three versions old: weight 0.5
    # FedBuff: sum_i n_i w(s_i) delta_i / sum_i n_i
    assert acc.aggregate()["w"] == pytest.approx(np.full(2, (1.0 + 3 * 0.5) / 4))
    assert acc.count == 2
    assert acc.staleness == {0: 1, 3: 1}
    assert acc.figures()["staleness_mean"] == 1.5 and acc.figures()["staleness_max"] == 3.0


def test_a_buffer_of_equally_stale_updates_makes_a_smaller_step() -> None:
    fresh = StalenessWeighted(WeightedSum(SPEC), Weighting("polynomial", 0.5), applies_to=3)
    stale = StalenessWeighted(WeightedSum(SPEC), Weighting("polynomial", 0.5), applies_to=3)
    for d in "ab":
        fresh.fold(_c(d, 2.0, base=3))
        stale.fold(_c(d, 2.0, base=0))
    assert fresh.aggregate()["w"] == pytest.approx([2.0, 2.0])
    assert stale.aggregate()["w"] == pytest.approx([1.0, 1.0])


def test_constant_weighting_leaves_the_rule_as_it_is() -> None:
    acc = StalenessWeighted(WeightedSum(SPEC), Weighting("constant"), applies_to=9)
    acc.fold(_c("a", 1.0, base=0))
    acc.fold(_c("b", 3.0, base=9))
    assert acc.aggregate()["w"] == pytest.approx([2.0, 2.0])


def test_around_a_robust_rule_and_fednova() -> None:
    median = StalenessWeighted(CoordinateMedian(SPEC), Weighting("polynomial", 1.0), applies_to=1)
    for d, v in (("a", 1.0), ("b", 2.0), ("c", 100.0)):
        median.fold(_c(d, v, base=1))
    assert median.aggregate()["w"] == pytest.approx([2.0, 2.0])

    nova = StalenessWeighted(NormalisedSum(SPEC), Weighting("polynomial", 1.0), applies_to=1)
    nova.fold(_c("a", 4.0, base=1, steps=4.0))
    nova.fold(_c("b", 2.0, base=0, steps=2.0))  # staleness 1: delta halved
    # FedNova: tau_eff * mean(delta_i / tau_i) = 3 * mean(1, 0.5)
    assert nova.aggregate()["w"] == pytest.approx([2.25, 2.25])
    assert nova.figures()["effective_steps"] == 3.0


def test_nothing_folded_aggregates_to_none() -> None:
    assert StalenessWeighted(WeightedSum(SPEC), Weighting(), applies_to=0).aggregate() is None


@pytest.mark.parametrize(
    ("rounds", "says"),
    [
        ({"mode": "fedbuff"}, "rounds.mode"),
        ({"staleness": "linear"}, "rounds.staleness"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"concurrency": -1}, "concurrency"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"staleness_exponent": -0.5}, "staleness_exponent"),
        ({"max_tasks_share": 0.0}, "max_tasks_share"),
        ({"max_tasks_share": 1.5}, "max_tasks_share"),
    ],
)
def test_bad_async_settings_are_refused_with_the_key(rounds: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        from_dict(AggregatorConfig, {"rounds": rounds})


def test_async_settings_load_and_sync_stays_the_default() -> None:
    assert RoundsConfig().mode == "sync"
    cfg = from_dict(
        AggregatorConfig,
        {"rounds": {"mode": "async", "concurrency": 8, "buffer_size": 4, "staleness": "hinge",
                    "max_staleness": 6, "max_tasks_share": 0.5}},
    )
    rc = cfg.rounds
    assert (rc.mode, rc.concurrency, rc.buffer_size, rc.staleness) == ("async", 8, 4, "hinge")
    assert (rc.max_staleness, rc.max_tasks_share) == (6, 0.5)


def test_values_set_after_construction_are_checked_by_the_aggregator(tmp_path) -> None:
    from aggregator.service import Aggregator

    cfg = AggregatorConfig(state_dir=str(tmp_path))
    cfg.rounds.mode = "asynchronous"
    with pytest.raises(ConfigError, match="rounds.mode"):
        Aggregator(cfg)
