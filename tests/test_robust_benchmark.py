"""benchmarks/robust_aggregation.py: its attacks are what it says, and its rounds go through
the rule configured in [strategy], deterministically for a seed."""

from __future__ import annotations

from aggregator.robust import METHODS
from benchmarks.robust_aggregation import ATTACKERS, ATTACKS, RULES, Job, simulate


def test_every_attack_is_four_of_the_twenty_b1_devices() -> None:
    assert len(ATTACKERS) == 4 and all(0 <= i < 20 for i in ATTACKERS)
    assert ATTACKS["clean"] == {}
    for name, factors in ATTACKS.items():
        if name != "clean":
            assert sorted(factors) == sorted(ATTACKERS), name
    assert set(ATTACKS["half each"].values()) == {-1.0, -10.0}
    assert {r["aggregation"] for r in RULES.values()} == set(METHODS)


def test_the_screen_drops_the_attackers_and_the_mean_does_not() -> None:
    # two rounds are enough to see the rule at work: the mean is wrecked by x(-10) at once
    screened = simulate(Job("screened_clip", "x(-10)", seed=0, rounds=2))
    plain = simulate(Job("mean (FedAvg)", "x(-10)", seed=0, rounds=2))
    assert screened["dropped_per_round"] >= len(ATTACKERS)
    assert plain["dropped_per_round"] == 0
    assert screened["final_acc"] > plain["final_acc"] + 0.3


def test_a_seed_gives_the_same_run() -> None:
    a = simulate(Job("median", "sign-flipped", seed=1, rounds=2))
    b = simulate(Job("median", "sign-flipped", seed=1, rounds=2))
    c = simulate(Job("median", "sign-flipped", seed=2, rounds=2))
    assert a["acc_by_round"] == b["acc_by_round"]
    assert a["acc_by_round"] != c["acc_by_round"]
