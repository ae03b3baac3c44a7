"""Aggregation (aggregator/aggregation.py) and the server strategies (aggregator/strategies/).

The strategy tests check two rounds of each optimiser against numbers worked out by hand from
the update rules in the papers, not against the implementation's own formulas.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from aggregator.aggregation import WeightedSum
from aggregator.strategies import FedAdam, FedAvg, FedAvgM, Strategy, make_strategy
from edgefl.config import StrategyConfig

SPEC = {"w": (2, 3), "b": (3,)}


def random_delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SPEC.items()}


def dyadic_delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Multiples of 2**-10 in [-4, 4): weighted sums of these are exact in float64."""
    return {k: (rng.integers(-4096, 4096, s) / 1024).astype(np.float32) for k, s in SPEC.items()}


# ---------------------------------------------------------------------------------------------
# WeightedSum


def test_mean_equals_a_numpy_weighted_average():
    rng = np.random.default_rng(0)
    deltas = [random_delta(rng) for _ in range(7)]
    weights = [12, 40, 3, 88, 1, 17, 25]
    ws = WeightedSum(SPEC)
    for d, n in zip(deltas, weights, strict=True):
        ws.add(d, n)
    mean = ws.mean()
    assert (ws.count, ws.weight) == (7, float(sum(weights)))
    assert list(mean) == list(SPEC)
    for k in SPEC:
        expected = np.average(np.stack([d[k] for d in deltas]), axis=0, weights=weights)
        assert mean[k].dtype == np.float32 and mean[k].shape == SPEC[k]
        np.testing.assert_allclose(mean[k], expected, rtol=1e-6, atol=1e-7)


def test_one_update_is_its_own_mean():
    delta = random_delta(np.random.default_rng(1))
    ws = WeightedSum(SPEC)
    ws.add(delta, 33)
    for k in SPEC:
        np.testing.assert_array_equal(ws.mean()[k], delta[k])


def test_fractional_weights():
    ws = WeightedSum({"x": (1,)})
    ws.add({"x": np.array([1.0], np.float32)}, 0.25)
    ws.add({"x": np.array([3.0], np.float32)}, 0.75)
    np.testing.assert_array_equal(ws.mean()["x"], [2.5])


def test_merge_of_two_partial_sums_equals_one_sum_over_all_exactly():
    rng = np.random.default_rng(2)
    deltas = [dyadic_delta(rng) for _ in range(11)]
    weights = [int(n) for n in rng.integers(1, 500, 11)]
    whole, left, right = WeightedSum(SPEC), WeightedSum(SPEC), WeightedSum(SPEC)
    for i, (d, n) in enumerate(zip(deltas, weights, strict=True)):
        whole.add(d, n)
        (left if i % 3 else right).add(d, n)
    left.merge(right)
    assert (left.count, left.weight) == (whole.count, whole.weight) == (11, float(sum(weights)))
    for k in SPEC:
        np.testing.assert_array_equal(left.state()["sum"][k], whole.state()["sum"][k])
        np.testing.assert_array_equal(left.mean()[k], whole.mean()[k])


def test_merge_with_an_empty_sum_changes_nothing():
    ws = WeightedSum(SPEC)
    ws.add(dyadic_delta(np.random.default_rng(3)), 5)
    before = ws.mean()
    ws.merge(WeightedSum(SPEC))
    assert ws.count == 1
    for k in SPEC:
        np.testing.assert_array_equal(ws.mean()[k], before[k])


def test_sum_is_kept_in_float64():
    # 20,000 contributions of 0.1: a float32 running sum would drift by about 2e-4 relative
    ws = WeightedSum({"x": (1,)})
    delta = {"x": np.array([0.1], np.float32)}
    for _ in range(20_000):
        ws.add(delta, 1)
    assert ws.state()["sum"]["x"].dtype == np.float64
    np.testing.assert_allclose(ws.mean()["x"], [np.float32(0.1)], rtol=1e-7)


@pytest.mark.parametrize("weight", [0, 0.0, -1, -0.5, float("nan")])
def test_non_positive_weight_is_refused(weight):
    ws = WeightedSum(SPEC)
    with pytest.raises(ValueError, match="weight must be positive"):
        ws.add(random_delta(np.random.default_rng(0)), weight)
    assert ws.count == 0 and ws.weight == 0.0


def test_mismatched_tensor_names_are_refused():
    ws = WeightedSum(SPEC)
    delta = random_delta(np.random.default_rng(0))
    with pytest.raises(ValueError, match="do not match"):
        ws.add({"w": delta["w"]}, 1)
    with pytest.raises(ValueError, match="do not match"):
        ws.add({**delta, "extra": np.zeros(3, np.float32)}, 1)
    with pytest.raises(ValueError, match="do not match"):
        ws.add({"w": delta["w"], "c": delta["b"]}, 1)
    assert ws.count == 0


@pytest.mark.parametrize("shape", [(1,), (), (3, 1), (1, 3), (4,)])
def test_mismatched_tensor_shapes_are_refused(shape):
    # a (1,) or () delta would otherwise broadcast over the whole tensor
    ws = WeightedSum(SPEC)
    good = dyadic_delta(np.random.default_rng(0))
    ws.add(good, 2)
    bad = {"w": good["w"], "b": np.ones(shape, np.float32)}
    with pytest.raises(ValueError, match="shape"):
        ws.add(bad, 1)
    assert (ws.count, ws.weight) == (1, 2.0)  # nothing of the bad update went in
    for k in SPEC:
        np.testing.assert_array_equal(ws.mean()[k], good[k])


def test_mean_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no updates"):
        WeightedSum(SPEC).mean()


def test_weighted_sum_state_round_trip_continues_identically_and_independently():
    rng = np.random.default_rng(4)
    first, second = dyadic_delta(rng), dyadic_delta(rng)
    original = WeightedSum(SPEC)
    original.add(first, 10)
    restored = WeightedSum(SPEC)
    restored.load_state(copy.deepcopy(original.state()))
    assert (restored.count, restored.weight) == (1, 10.0)
    original.add(second, 30)
    restored.add(second, 30)
    for k in SPEC:
        np.testing.assert_array_equal(restored.mean()[k], original.mean()[k])
    # restoring from the live state does not tie the two sums together
    twin = WeightedSum(SPEC)
    twin.load_state(original.state())
    twin.add(first, 5)
    assert original.count == 2 and twin.count == 3
    for k in SPEC:
        np.testing.assert_array_equal(
            original.state()["sum"][k], 10 * first[k].astype(np.float64) + 30 * second[k]
        )


def test_weighted_sum_state_accepts_lists():
    ws = WeightedSum({"x": (2,)})
    ws.load_state({"sum": {"x": [3.0, 6.0]}, "weight": 3, "count": 2})
    np.testing.assert_array_equal(ws.mean()["x"], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# strategies: two rounds by hand

W0 = {"a": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([[0.25]], np.float32)}
D1 = {"a": np.array([0.1, -0.2, 0.0], np.float32), "b": np.array([[1.0]], np.float32)}
D2 = {"a": np.array([0.3, 0.4, -0.5], np.float32), "b": np.array([[-1.0]], np.float32)}
D3 = {"a": np.array([-0.1, 0.05, 0.2], np.float32), "b": np.array([[0.5]], np.float32)}


def assert_weights(got: dict[str, np.ndarray], expected: dict[str, list], rtol: float = 1e-6):
    assert list(got) == list(expected)
    for k, e in expected.items():
        assert got[k].dtype == np.float32, k
        np.testing.assert_allclose(
            got[k], np.array(e, dtype=np.float64).reshape(got[k].shape), rtol=rtol, atol=1e-7
        )


@pytest.mark.parametrize("server_lr", [1.0, 0.5, 2.0])
def test_fedavg_step_is_weights_plus_scaled_mean_delta(server_lr):
    s = FedAvg(server_lr=server_lr)
    w1 = s.step(W0, D1)
    assert_weights(
        w1,
        {
            "a": [1.0 + server_lr * 0.1, -2.0 - server_lr * 0.2, 0.5],
            "b": [0.25 + server_lr * 1.0],
        },
    )
    # no memory: the second step depends only on its inputs
    assert_weights(s.step(w1, D2), FedAvg(server_lr).step(w1, D2))
    assert s.state() == {}


def test_fedavg_does_not_modify_its_inputs():
    w, d = copy.deepcopy(W0), copy.deepcopy(D1)
    FedAvg().step(w, d)
    for k in W0:
        np.testing.assert_array_equal(w[k], W0[k])
        np.testing.assert_array_equal(d[k], D1[k])


def test_fedavg_accepts_a_float64_mean_delta():
    delta = {k: v.astype(np.float64) for k, v in D1.items()}
    assert all(v.dtype == np.float32 for v in FedAvg().step(W0, delta).values())


def test_fedavgm_two_steps_by_hand():
    # Hsu et al. 2019: v <- momentum * v + delta; w <- w + server_lr * v; momentum 0.9, lr 0.5
    s = FedAvgM(server_lr=0.5, momentum=0.9)
    w1 = s.step(W0, D1)
    # v1 = D1 = a [0.1, -0.2, 0], b [1]
    assert_weights(w1, {"a": [1.05, -2.1, 0.5], "b": [0.75]})
    assert_weights(s.state()["velocity"], {"a": [0.1, -0.2, 0.0], "b": [1.0]})
    w2 = s.step(w1, D2)
    # v2 = 0.9 v1 + D2 = a [0.09 + 0.3, -0.18 + 0.4, 0 - 0.5] = [0.39, 0.22, -0.5], b [0.9 - 1]
    assert_weights(s.state()["velocity"], {"a": [0.39, 0.22, -0.5], "b": [-0.1]})
    # w2 = w1 + 0.5 v2
    assert_weights(w2, {"a": [1.05 + 0.195, -2.1 + 0.11, 0.5 - 0.25], "b": [0.75 - 0.05]})


def test_fedavgm_with_zero_momentum_is_fedavg():
    a, b = FedAvgM(server_lr=0.7, momentum=0.0), FedAvg(server_lr=0.7)
    wa, wb = a.step(W0, D1), b.step(W0, D1)
    wa, wb = a.step(wa, D2), b.step(wb, D2)
    for k in W0:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-7)


def test_fedadam_two_steps_by_hand():
    # Reddi et al. 2021, Algorithm 2, no bias correction:
    #   m <- b1 m + (1 - b1) d;  v <- b2 v + (1 - b2) d^2;  w <- w + lr m / (sqrt(v) + tau)
    s = FedAdam(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    w1 = s.step(W0, D1)
    # m1 = 0.1 D1 = a [0.01, -0.02, 0], b [0.1]
    # v1 = 0.01 D1^2 = a [1e-4, 4e-4, 0], b [0.01]; sqrt(v1) = a [0.01, 0.02, 0], b [0.1]
    assert_weights(s.state()["m"], {"a": [0.01, -0.02, 0.0], "b": [0.1]}, rtol=1e-5)
    assert_weights(s.state()["v"], {"a": [1e-4, 4e-4, 0.0], "b": [0.01]}, rtol=1e-5)
    expected_w1 = {
        "a": [1.0 + 0.01 * 0.01 / 0.011, -2.0 - 0.01 * 0.02 / 0.021, 0.5],
        "b": [0.25 + 0.01 * 0.1 / 0.101],
    }
    assert_weights(w1, expected_w1, rtol=1e-5)
    w2 = s.step(w1, D2)
    # m2 = 0.9 m1 + 0.1 D2 = a [0.009 + 0.03, -0.018 + 0.04, -0.05], b [0.09 - 0.1]
    m2 = {"a": [0.039, 0.022, -0.05], "b": [-0.01]}
    # v2 = 0.99 v1 + 0.01 D2^2 = a [0.99e-4 + 9e-4, 3.96e-4 + 16e-4, 25e-4], b [0.0099 + 0.01]
    v2 = {"a": [9.99e-4, 19.96e-4, 25e-4], "b": [0.0199]}
    assert_weights(s.state()["m"], m2, rtol=1e-5)
    assert_weights(s.state()["v"], v2, rtol=1e-5)
    expected_w2 = {
        k: [
            w + 0.01 * m / (np.sqrt(v) + 1e-3)
            for w, m, v in zip(expected_w1[k], m2[k], v2[k], strict=True)
        ]
        for k in m2
    }
    assert_weights(w2, expected_w2, rtol=1e-5)


def test_fedadam_first_step_is_not_bias_corrected():
    # With Adam's bias correction the first step is lr * d / (|d| + tau), about lr * sign(d) = 1.
    # Without it (the paper's version) it is lr * (1 - b1) d / (sqrt(1 - b2) |d| + tau).
    s = FedAdam(server_lr=1.0, beta1=0.9, beta2=0.5, tau=1e-9)
    w = s.step({"x": np.zeros(1, np.float32)}, {"x": np.array([2.0], np.float32)})
    np.testing.assert_allclose(w["x"], [0.1 * 2.0 / np.sqrt(0.5 * 4.0)], rtol=1e-6)  # 0.141


def make_all() -> list[Strategy]:
    return [
        FedAvg(server_lr=0.8),
        FedAvgM(server_lr=0.5, momentum=0.9),
        FedAdam(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3),
    ]


@pytest.mark.parametrize("index", range(3), ids=["fedavg", "fedavgm", "fedadam"])
def test_state_round_trip_lets_a_fresh_strategy_continue_identically(index):
    uninterrupted = make_all()[index]
    w = uninterrupted.step(W0, D1)
    w = uninterrupted.step(w, D2)
    # a checkpoint: plain arrays (here float64 lists, as a JSON or msgpack store might give)
    saved = {
        part: {k: np.asarray(a, dtype=np.float64).tolist() for k, a in tensors.items()}
        for part, tensors in uninterrupted.state().items()
    }
    restored = make_all()[index]
    restored.load_state(saved)
    for part, tensors in uninterrupted.state().items():
        for k, a in tensors.items():
            np.testing.assert_array_equal(restored.state()[part][k], a)
    w_uninterrupted = uninterrupted.step(w, D3)
    w_restored = restored.step(w, D3)
    for k in W0:
        np.testing.assert_array_equal(w_restored[k], w_uninterrupted[k])


@pytest.mark.parametrize("index", [1, 2], ids=["fedavgm", "fedadam"])
def test_server_optimiser_state_matters(index):
    # without its state a fresh optimiser takes a different step: the round trip test can fail
    with_state = make_all()[index]
    w = with_state.step(W0, D1)
    fresh = make_all()[index]
    assert not np.allclose(with_state.step(w, D2)["a"], fresh.step(w, D2)["a"])


def test_load_state_of_nothing_starts_afresh():
    s = FedAvgM(momentum=0.9)
    s.step(W0, D1)
    s.load_state({})
    assert s.state() == {"velocity": {}}
    a = FedAdam()
    a.step(W0, D1)
    a.load_state({})
    assert a.state() == {"m": {}, "v": {}}


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_fedavgm_refuses_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"):
        FedAvgM(momentum=momentum)


@pytest.mark.parametrize(
    "kw", [{"beta1": 1.0}, {"beta2": 1.0}, {"beta1": -0.1}, {"tau": 0.0}, {"tau": -1e-3}]
)
def test_fedadam_refuses_bad_hyperparameters(kw):
    with pytest.raises(ValueError, match="FedAdam"):
        FedAdam(**kw)


def test_make_strategy_builds_each_from_config():
    avg = make_strategy(StrategyConfig(name="fedavg", server_lr=0.3))
    assert isinstance(avg, FedAvg) and avg.server_lr == 0.3 and avg.name == "fedavg"
    avgm = make_strategy(StrategyConfig(name="fedavgm", server_lr=0.7, momentum=0.5))
    assert isinstance(avgm, FedAvgM) and (avgm.server_lr, avgm.momentum) == (0.7, 0.5)
    adam = make_strategy(
        StrategyConfig(name="fedadam", server_lr=0.02, beta1=0.8, beta2=0.95, tau=1e-2)
    )
    assert isinstance(adam, FedAdam)
    assert (adam.server_lr, adam.beta1, adam.beta2, adam.tau) == (0.02, 0.8, 0.95, 1e-2)
    assert adam.name == "fedadam"


@pytest.mark.parametrize("name", ["fedprox", "FedAvg", "", "fed avg"])
def test_make_strategy_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=f"unknown strategy {name!r}"):
        make_strategy(StrategyConfig(name=name))
