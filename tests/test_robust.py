"""Robust aggregation rules: the arithmetic, and what a hostile minority can and cannot do."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.robust import (
    METHODS,
    ClippedSum,
    CoordinateMedian,
    RoundClip,
    TrimmedMean,
    l2_norm,
    make_accumulator,
)

SPEC = {"w": (3, 2), "b": (2,)}


def _delta(rng, scale=1.0):
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SPEC.items()}


def test_median_and_trimmed_mean_match_numpy() -> None:
    rng = np.random.default_rng(0)
    deltas = [_delta(rng) for _ in range(10)]
    med, trim = CoordinateMedian(SPEC), TrimmedMean(SPEC, 0.2)
    for d in deltas:
        med.add(d, 1.0)
        trim.add(d, 5.0)
    for k in SPEC:
        stacked = np.stack([d[k] for d in deltas])
        np.testing.assert_allclose(med.mean()[k], np.median(stacked, axis=0), rtol=1e-6)
        expected = np.sort(stacked, axis=0)[2:8].mean(axis=0)
        np.testing.assert_allclose(trim.mean()[k], expected, rtol=1e-6)


def test_trimmed_mean_with_too_few_to_trim_is_the_mean() -> None:
    rng = np.random.default_rng(1)
    deltas = [_delta(rng) for _ in range(3)]
    acc = TrimmedMean(SPEC, 0.2)  # floor(0.2 * 3) = 0
    for d in deltas:
        acc.add(d, 1.0)
    np.testing.assert_allclose(
        acc.mean()["w"], np.mean([d["w"] for d in deltas], axis=0), rtol=1e-6
    )


def test_fixed_clip_bounds_every_contribution() -> None:
    rng = np.random.default_rng(2)
    acc = ClippedSum(SPEC, clip=1.0)
    big = _delta(rng, scale=100.0)
    acc.add(big, 1.0)
    assert acc.clipped == 1
    assert l2_norm(acc.mean()) == pytest.approx(1.0, rel=1e-5)


def test_round_clip_limits_a_scaled_update_to_the_honest_size() -> None:
    rng = np.random.default_rng(3)
    honest = [_delta(rng) for _ in range(8)]
    acc = RoundClip(SPEC, multiplier=2.0, screen=False)
    for d in honest:
        acc.add(d, 1.0)
    acc.add({k: v * 1000 for k, v in honest[0].items()}, 1.0)
    result = acc.mean()
    assert acc.clipped >= 1
    bound = 2.0 * np.median([l2_norm(d) for d in honest] + [1000 * l2_norm(honest[0])])
    assert l2_norm(result) <= bound


def test_screening_drops_sign_flipped_updates() -> None:
    rng = np.random.default_rng(4)
    direction = _delta(rng)
    honest = [
        {k: v + 0.1 * rng.normal(size=v.shape) for k, v in direction.items()} for _ in range(8)
    ]
    flipped = [{k: -v for k, v in d.items()} for d in honest[:2]]
    acc = RoundClip(SPEC, multiplier=2.0, screen=True)
    for d in honest + flipped:
        acc.add(d, 1.0)
    result = acc.mean()
    assert acc.dropped == 2
    clean = RoundClip(SPEC, multiplier=2.0, screen=False)
    for d in honest:
        clean.add(d, 1.0)
    for k in SPEC:
        np.testing.assert_allclose(result[k], clean.mean()[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "screened_clip"])
def test_a_hostile_minority_cannot_drag_the_aggregate_far(method: str) -> None:
    rng = np.random.default_rng(5)
    direction = _delta(rng)
    honest = [
        {k: v + 0.05 * rng.normal(size=v.shape) for k, v in direction.items()} for _ in range(16)
    ]
    acc = make_accumulator(method, SPEC, trim=0.25)
    for d in honest:
        acc.add(d, 1.0)
    for i in range(4):  # 20 %: two scaled by -10, two sign-flipped
        acc.add({k: v * (-10.0 if i % 2 else -1.0) for k, v in direction.items()}, 1.0)
    result = acc.mean()
    gap = l2_norm({k: result[k] - direction[k] for k in SPEC})
    assert gap < 0.5 * l2_norm(direction)
    mean = make_accumulator("mean", SPEC)
    for d in honest:
        mean.add(d, 1.0)
    for i in range(4):
        mean.add({k: v * (-10.0 if i % 2 else -1.0) for k, v in direction.items()}, 1.0)
    assert l2_norm({k: mean.mean()[k] - direction[k] for k in SPEC}) > l2_norm(direction)


def test_rules_refuse_bad_settings_and_inputs() -> None:
    with pytest.raises(ValueError):
        make_accumulator("krum", SPEC)
    with pytest.raises(ValueError):
        TrimmedMean(SPEC, 0.5)
    with pytest.raises(ValueError):
        ClippedSum(SPEC, 0.0)
    for method in METHODS:
        acc = make_accumulator(method, SPEC)
        with pytest.raises(ValueError):
            acc.mean()
        with pytest.raises(ValueError):
            acc.add({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, 1.0)
