"""Personalised models, without a broker: the [personal] table and its wire form, the shared /
personal split of a model, the aggregator's arithmetic over a part of the model, the maths of
each method (device/personal/), and the personal state on the disk."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aggregator.robust import METHODS as AGGREGATIONS
from aggregator.robust import accumulator_for
from aggregator.strategies import make_strategy
from device.personal import METHODS, Settings, make_personaliser
from device.personal.apfl import mix
from device.personal.perfedavg import meta_step
from device.personal.state import FILE_NAME
from device.personal.trainer import TaskTrainer, holdout_split
from edgefl.compression import WireError, spec_tag
from edgefl.config import (
    PERSONAL_METHODS,
    AggregatorConfig,
    ConfigError,
    StrategyConfig,
    from_dict,
)
from edgefl.data import Dataset
from edgefl.messages import Task
from edgefl.models import MODELS, build_model, get_weights, model_spec, personal_keys, shared_spec

MODEL = "mlp_digits"


def task(method: str, round_: int = 3, epochs: int = 1, **personal) -> Task:
    return Task(
        round_, 2, epochs, 16, 0.1, {"name": "dense_fp32"}, time.time() + 60,
        personal={"method": method, **personal},
    )


@pytest.fixture(scope="module")
def small(digits) -> Dataset:
    train, _ = digits
    return Dataset(train.X[:96], train.y[:96])


@pytest.fixture(scope="module")
def base() -> dict[str, np.ndarray]:
    return get_weights(build_model(MODEL, seed=0))


def other_global(base: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in base.items()}


def personaliser(method: str, data: Dataset, t: Task | None = None, state=None):
    model = build_model(MODEL)
    settings = Settings.from_task(t or task(method))
    return make_personaliser(settings, model, MODEL, model_spec(model), data, "dev-7", state)


# -- configuration and the wire ------------------------------------------------------------------


def test_an_unknown_method_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="personal.method 'maml' is not one of none, local"):
        from_dict(AggregatorConfig, {"personal": {"method": "maml"}})
    cfg = from_dict(AggregatorConfig, {"personal": {"method": "ditto", "ditto_lambda": 1}})
    assert cfg.personal.method == "ditto" and cfg.personal.ditto_lambda == 1.0


def test_every_method_but_none_has_a_module() -> None:
    assert set(METHODS) | {"none"} == set(PERSONAL_METHODS)


def test_a_task_carries_the_whole_personal_table() -> None:
    sent = task("fedrep", personal_layers=1, lr=0.5)
    obj = json.loads(sent.to_payload())
    assert set(obj["personal"]) == set(AggregatorConfig().personal.__dict__)
    assert obj["personal"]["method"] == "fedrep" and obj["personal"]["lr"] == 0.5
    assert Task.from_payload(sent.to_payload()) == sent


@pytest.mark.parametrize(
    "change",
    [
        {"method": "maml"},
        {"epochs": 1.0},  # an integral float is not an integer
        {"holdout": 1.5},
        {"holdout_split": "newest"},
        {"holdout_gap": -1},
        {"apfl_alpha": True},
        {"surprise": 1},
        None,  # a field missing
    ],
)
def test_a_task_with_a_bad_personal_table_is_refused(change) -> None:
    obj = json.loads(task("ditto").to_payload())
    if change is None:
        del obj["personal"]["ditto_lambda"]
    else:
        obj["personal"].update(change)
    with pytest.raises(WireError) as e:
        Task.from_payload(json.dumps(obj).encode())
    assert e.value.reason == "personal"
    obj["personal"] = "ditto"
    with pytest.raises(WireError):
        Task.from_payload(json.dumps(obj).encode())


def test_personal_keys_are_the_last_layers_with_parameters() -> None:
    assert personal_keys(MODEL, 1) == ("2.weight", "2.bias")
    assert personal_keys("cnn_fmnist", 2) == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    with pytest.raises(ValueError, match="at least one must stay shared"):
        personal_keys(MODEL, 2)
    for name in MODELS:
        spec = model_spec(build_model(name))
        shared = shared_spec(spec, 1)
        assert list(shared) == [k for k in spec if k not in personal_keys(spec, 1)]
        # an update with the personal layers cannot pass for one without them
        assert spec_tag(shared) != spec_tag(spec)


def test_a_model_too_shallow_for_its_personal_layers_is_a_config_error(tmp_path) -> None:
    from aggregator.service import Aggregator

    cfg = AggregatorConfig(state_dir=str(tmp_path))
    cfg.personal.method, cfg.personal.personal_layers = "fedper", 2
    with pytest.raises(ConfigError, match="personal_layers 2"):
        Aggregator(cfg)


def test_the_holdout_split_is_seeded_by_the_device_and_never_empties_a_side(small) -> None:
    train, held = holdout_split(small, 0.2, "dev-1")
    assert (len(train), len(held)) == (77, 19)
    again = holdout_split(small, 0.2, "dev-1")
    np.testing.assert_array_equal(again[1].X, held.X)
    other = holdout_split(small, 0.2, "dev-2")[1]
    assert not np.array_equal(other.X, held.X)
    rows = {r.tobytes() for r in np.concatenate([train.X, held.X])}
    assert len(rows) == len({r.tobytes() for r in small.X})
    for n, share, sizes in [(2, 0.2, (1, 1)), (3, 0.9, (1, 2)), (1, 0.5, (1, 0))]:
        t, h = holdout_split(Dataset(small.X[:n], small.y[:n]), share, "d")
        assert (len(t), len(h)) == sizes


def test_the_latest_split_holds_out_each_class_newest_samples_behind_a_gap() -> None:
    # two "recordings" per class, each a run of consecutive ids, as a time series' file is
    y = np.repeat([0, 1, 0, 1], [30, 20, 30, 20])
    data = Dataset(np.arange(len(y), dtype=np.float32)[:, None], y)
    train, held = holdout_split(data, 0.2, "dev-1", "latest", gap=1)
    for c, n in ((0, 60), (1, 40)):
        kept, out = train.X[train.y == c, 0], held.X[held.y == c, 0]
        assert len(out) == round(0.2 * n) and len(kept) == n - len(out) - 1  # one in the gap
        assert kept.max() + 1 < out.min()  # every held-out sample after every training one
    assert (train.X[:, 0] == 99).sum() == 0 and 99 in held.X[:, 0]  # the newest is held out
    # without a gap, both parts together are the data; the same on every device
    t0, h0 = holdout_split(data, 0.2, "dev-1", "latest")
    assert len(t0) + len(h0) == len(data)
    np.testing.assert_array_equal(h0.X, holdout_split(data, 0.2, "dev-9", "latest")[1].X)
    # a class too small to spare a sample stays in training; a side is never empty
    tiny = Dataset(np.arange(3, dtype=np.float32)[:, None], np.array([0, 1, 2]))
    t, h = holdout_split(tiny, 0.2, "d", "latest", gap=5)
    assert (len(t), len(h)) == (2, 1) and h.X[0, 0] == 2


def test_windows_held_out_by_the_watch_config_share_no_reading_with_training() -> None:
    import tomllib
    from pathlib import Path

    from edgefl.config import PersonalConfig

    table = tomllib.loads((Path(__file__).parent.parent / "configs/b8_watch.toml").read_text())
    personal = PersonalConfig(**table["personal"])
    # windows of 4 readings every 2 (half overlapping, as the watch set's), two recordings
    starts = np.concatenate([np.arange(0, 80, 2), np.arange(1000, 1060, 2)])
    X = np.stack([np.arange(s, s + 4) for s in starts]).astype(np.float32)
    y = np.zeros(len(X), np.int64)
    train, held = holdout_split(
        Dataset(X, y), personal.holdout, "d", personal.holdout_split, personal.holdout_gap
    )
    assert len(held) and not set(train.X.ravel()) & set(held.X.ravel())


# -- the aggregator over part of the model ---------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_server_optimisers_leave_tensors_the_delta_does_not_cover(name) -> None:
    strategy = make_strategy(StrategyConfig(name=name, server_lr=0.5))
    weights = {"body": np.ones(3, np.float32), "head": np.full(2, 7.0, np.float32)}
    for _ in range(2):
        weights = strategy.step(weights, {"body": np.full(3, 0.2, np.float32)})
    np.testing.assert_array_equal(weights["head"], [7.0, 7.0])
    assert (weights["body"] > 1.0).all()
    assert set(strategy.state().get("velocity", strategy.state().get("m", {}))) <= {"body"}


@pytest.mark.parametrize("rule", AGGREGATIONS)
@pytest.mark.parametrize("fednova", [False, True])
def test_aggregation_rules_work_over_the_shared_spec(rule, fednova) -> None:
    from aggregator.aggregation import Contribution

    shared = shared_spec(model_spec(build_model(MODEL)), 1)
    acc = accumulator_for(StrategyConfig(aggregation=rule, fednova=fednova), shared)
    rng = np.random.default_rng(0)
    for i in range(4):
        delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shared.items()}
        acc.fold(Contribution(f"d{i}", delta, 10.0 + i, 5.0, 0))
    out = acc.aggregate()
    assert list(out) == list(shared) and all(out[k].shape == shared[k] for k in shared)


# -- the maths of the methods ---------------------------------------------------------------------


def test_apfl_mixes_its_parameters() -> None:
    v = {"a": np.array([1.0, 3.0], np.float32)}
    w = {"a": np.array([5.0, -1.0], np.float32)}
    np.testing.assert_allclose(mix(v, w, 0.25)["a"], [4.0, 0.0])
    np.testing.assert_allclose(mix(v, w, 1.0)["a"], v["a"])


def test_apfl_step_updates_w_v_and_alpha_as_the_paper_says(small, base) -> None:
    """One minibatch, one step (Deng et al. 2020, Algorithm 1), against autograd by hand."""
    from device.personal.state import PersonalState

    data = Dataset(small.X[:16], small.y[:16])
    v0 = other_global(base, seed=5)
    alpha0, lr, lr_p = 0.4, 0.1, 0.05
    state = PersonalState("apfl", {k: v.shape for k, v in base.items()}, {}, {"local": v0},
                          {"alpha": alpha0})
    p = personaliser("apfl", data, task("apfl", lr=lr_p), state)
    w1, result = p.train(task("apfl", lr=lr_p), base, data)
    assert result.steps == 1

    def grads(weights):
        model = build_model(MODEL)
        from edgefl.models import set_weights

        set_weights(model, weights)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(data.X)),
                                           torch.from_numpy(data.y))
        g = torch.autograd.grad(loss, list(model.parameters()))
        return {k: t.numpy() for k, t in zip(base, g, strict=True)}

    g_w = grads(base)
    g_bar = grads(mix(v0, base, alpha0))
    slots, scalars, _ = p._read()
    g_alpha = sum(float(((v0[k] - base[k]) * g_bar[k]).sum()) for k in base)
    assert scalars["alpha"] == pytest.approx(min(1, max(0, alpha0 - lr_p * g_alpha)), abs=1e-6)
    for k in base:
        np.testing.assert_allclose(w1[k], base[k] - lr * g_w[k], atol=1e-6)
        np.testing.assert_allclose(slots["local"][k], v0[k] - lr_p * alpha0 * g_bar[k],
                                   atol=1e-6)
    # and the personal model is the mix, on whichever global model it is given
    g = other_global(base)
    got = p.personalise(g)
    for k, x in mix(slots["local"], g, scalars["alpha"]).items():
        np.testing.assert_allclose(got[k], x, atol=1e-7)


def _distance(a, b) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_dittos_proximal_term_pulls_the_personal_model_towards_the_global(small, base) -> None:
    far = {}
    for lam in (0.0, 10.0):
        t = task("ditto", epochs=1, ditto_lambda=lam, lr=0.05)
        t.personal["epochs"] = 5
        p = personaliser("ditto", small, t)
        p.train(t, base, small)
        far[lam] = _distance(p._read()[0]["personal"], base)
    assert far[10.0] < 0.5 * far[0.0]
    # on the global model it was pulled towards: the stored model itself
    stored = p._read()[0]["personal"]
    got = p.personalise(base)
    assert all(np.array_equal(got[k], stored[k]) for k in base)
    # on another one: pulled towards that one, the same every time, the state untouched
    g = other_global(base)
    first, second = p.personalise(g), p.personalise(g)
    assert all(np.array_equal(first[k], second[k]) for k in base)
    assert not all(np.array_equal(first[k], stored[k]) for k in base)
    assert all(np.array_equal(p._read()[0]["personal"][k], stored[k]) for k in base)


def test_fedrep_trains_the_head_on_a_frozen_body_then_the_body_alone(small, base) -> None:
    head = set(personal_keys(MODEL, 1))
    p = personaliser("fedrep", small, task("fedrep", epochs=0))
    # the head phase only (the task asks for no body epochs): the body stays the global one
    sent, _ = p.train(task("fedrep", epochs=0), base, small)
    kept = p._read()[0]["head"]
    assert set(kept) == head
    for k in base:
        np.testing.assert_array_equal(sent[k], base[k])  # the head sent back is the global's
    assert all(not np.array_equal(kept[k], base[k]) for k in head)
    # the body phase only (no head epochs): the head stays as the device kept it
    body_only = task("fedrep", epochs=1)
    body_only.personal["epochs"] = 0
    p.settings = Settings.from_task(body_only)
    sent, _ = p.train(body_only, base, small)
    assert all(not np.array_equal(sent[k], base[k]) for k in base if k not in head)
    assert all(np.array_equal(p._read()[0]["head"][k], kept[k]) for k in head)
    # the personal model: the given global body with the device's head
    g = other_global(base)
    got = p.personalise(g)
    for k in base:
        np.testing.assert_array_equal(got[k], kept[k] if k in head else g[k])
    assert set(p.update_spec) == set(base) - head


def test_per_fedavg_takes_a_first_order_meta_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    D = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    D2 = (torch.randn(5, 3), torch.tensor([1, 1, 0, 0, 1]))
    alpha, beta = 0.3, 0.1
    w = [p.detach().clone() for p in model.parameters()]

    def grad_at(params, batch):
        params = [p.clone().requires_grad_(True) for p in params]
        loss = nn.functional.cross_entropy(batch[0] @ params[0].T + params[1], batch[1])
        return torch.autograd.grad(loss, params)

    inner = grad_at(w, D)
    w_tmp = [p - alpha * g for p, g in zip(w, inner, strict=True)]
    outer = grad_at(w_tmp, D2)  # first order: no Hessian term
    expected = [p - beta * g for p, g in zip(w, outer, strict=True)]
    meta_step(model, D, D2, alpha, beta)
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_personalise_is_deterministic_whole_and_leaves_the_state(method, small, base) -> None:
    p = personaliser(method, small)
    sent, result = p.train(task(method), base, small)
    assert set(sent) == set(base) and result.steps > 0
    before = p.state()
    for g in (base, other_global(base)):
        first, second = p.personalise(g), p.personalise(g)
        assert {k: v.shape for k, v in first.items()} == {k: v.shape for k, v in base.items()}
        assert all(np.array_equal(first[k], second[k]) for k in base)
        assert all(np.isfinite(first[k]).all() for k in base)
    after = p.state()
    assert before.scalars == after.scalars and before.notes == after.notes
    for slot, weights in before.slots.items():
        assert all(np.array_equal(weights[k], after.slots[slot][k]) for k in weights)
    with pytest.raises(ValueError):
        p.personalise({k: v for k, v in base.items() if k != "0.bias"})


# -- the state on the disk -------------------------------------------------------------------------


def trainer(tmp_path: Path, data: Dataset, model_name: str = MODEL) -> TaskTrainer:
    model = build_model(model_name)
    return TaskTrainer("dev-7", model_name, model, model_spec(model), data, tmp_path)


def test_the_state_survives_a_new_trainer_on_the_same_directory(tmp_path, small, base) -> None:
    first = trainer(tmp_path, small)
    trained = first.train(task("apfl"), base)
    assert trained.metrics["holdout_samples"] == 19 and trained.samples == 77
    assert 0.0 <= trained.metrics["personal_acc"] <= 1.0
    g = other_global(base)
    again = trainer(tmp_path, small)
    assert again.personaliser is not None and again.personaliser.method == "apfl"
    assert again.personaliser._read()[1] == first.personaliser._read()[1]  # alpha
    a, b = first.personal_model(g), again.personal_model(g)
    assert all(np.array_equal(a[k], b[k]) for k in base)


def test_a_state_for_another_model_shape_is_dropped_with_the_reason(
    tmp_path, small, base, caplog
) -> None:
    trainer(tmp_path, small).train(task("ditto"), base)
    assert (tmp_path / FILE_NAME).exists()
    wide = Dataset(np.zeros((10, 784), np.float32), np.zeros(10, np.int64))
    with caplog.at_level(logging.WARNING, logger="device.personal.state"):
        other = trainer(tmp_path, wide, "mlp_mnist")
    assert other.personaliser is None and other.personal_model({}) is None
    assert any("another model shape" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / FILE_NAME).exists()


def test_a_state_of_another_method_is_dropped_when_a_task_names_one(
    tmp_path, small, base, caplog
) -> None:
    t = trainer(tmp_path, small)
    t.train(task("ditto"), base)
    with caplog.at_level(logging.INFO, logger="device.personal.trainer"):
        t.train(task("local"), base)
    assert t.personaliser.method == "local"
    assert any("method ditto dropped" in r.getMessage() for r in caplog.records)
    t.train(task("none"), base)  # plain training: nothing kept, nothing held out
    assert t.personaliser is None and not (tmp_path / FILE_NAME).exists()
    assert t.personal_model(base) is None


def test_a_task_keeping_more_layers_than_the_model_has_is_declined(tmp_path, small) -> None:
    t = trainer(tmp_path, small)
    assert t.refusal(task("fedper", personal_layers=1)) is None
    assert t.refusal(task("ditto", personal_layers=5)) is None  # ditto keeps no layers
    assert "at least one must stay shared" in t.refusal(task("fedrep", personal_layers=2))


def test_an_unreadable_state_is_dropped_and_never_unpickled(tmp_path, small, caplog) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"PK\x03\x04 not a zip at all")
    with caplog.at_level(logging.WARNING, logger="device.personal.state"):
        assert trainer(tmp_path, small).personaliser is None
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    # an .npz whose arrays need pickle (object arrays) is refused the same way
    np.savez(tmp_path / FILE_NAME, meta=np.array([{"v": 1}], dtype=object))
    assert trainer(tmp_path, small).personaliser is None


# -- what an update says of them -------------------------------------------------------------------


def _envelope(metrics: dict[str, float]) -> bytes:
    from edgefl.compression import DenseCodec
    from edgefl.messages import Update, encode_compact_update

    delta = {"w": np.zeros(3, np.float32)}
    return encode_compact_update(Update("d", 1, 0, 5, delta, metrics), DenseCodec(), {"w": (3,)})


def test_personal_metrics_travel_in_the_update_and_are_checked() -> None:
    from edgefl.messages import decode_update

    sent = {"personal_acc": 17 / 19, "global_acc": 4 / 19, "holdout_samples": 19.0}
    got = decode_update(_envelope(sent), topic_device_id="d", spec={"w": (3,)}).metrics
    assert got == pytest.approx(sent, rel=1e-7)  # float32: devices stay told apart
    for bad in ({"personal_acc": 1.5}, {"global_acc": -0.1}, {"holdout_samples": -1.0}):
        with pytest.raises(WireError) as e:
            decode_update(_envelope(bad), topic_device_id="d", spec={"w": (3,)})
        assert e.value.reason == "malformed"
