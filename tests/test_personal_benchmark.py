"""benchmarks/b8_personal.py: its figures are what the issue asks for (each device's latest
report; mean, 10th percentile and worst over devices; medians over seeds; FedAvg's global model
from the fine-tuning runs; the best personalised method, never local-only), and its configs'
partitions leave every device a held-out split to be judged on."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

import edgefl.config
from benchmarks.b8_personal import (
    DATASETS,
    dataset_summary,
    latest_per_device,
    parse_setting,
    pooled_accuracy,
    run_figures,
    spread,
    targets_met,
)
from edgefl.config import DataConfig
from edgefl.data import load_split, partition
from edgefl.data.fashion_mnist import fashion_mnist_dir
from tests.data_sets import require_installed


def _round(number: int, devices: dict[str, tuple[float, float]], accuracy=0.5, up=1000) -> dict:
    """One round's line as the aggregator logs it, with the ``personal`` block."""
    return {
        "round": number,
        "accuracy": accuracy,
        "reported": len(devices),
        "uplink_bytes": up * len(devices),
        "personal": {
            "devices": {
                d: {"personal_acc": p, "global_acc": g, "holdout_samples": 10 + i}
                for i, (d, (p, g)) in enumerate(sorted(devices.items()))
            }
        },
    }


def _run(personal: list[float], global_: list[float], pooled: float = 0.8) -> dict:
    """One run's figures whose last round holds these per-device accuracies."""
    devices = {f"dev-{i:02d}": pg for i, pg in enumerate(zip(personal, global_, strict=True))}
    return run_figures({"rounds": [_round(1, devices, accuracy=pooled)], "wall_s": 1.0})


def test_a_device_counts_with_its_latest_report() -> None:
    rounds = [
        _round(1, {"a": (0.1, 0.2), "b": (0.3, 0.4)}),
        _round(2, {"a": (0.5, 0.6)}),  # b did not report this round
        {"round": 3, "accuracy": 0.7, "reported": 0, "uplink_bytes": 0},  # no personal block
    ]
    latest = latest_per_device(rounds)
    assert latest["a"]["personal_acc"] == 0.5 and latest["a"]["global_acc"] == 0.6
    assert latest["b"]["personal_acc"] == 0.3
    f = run_figures({"rounds": rounds, "wall_s": 2.0})
    assert f["devices"] == 2
    assert f["personal"]["mean"] == pytest.approx(0.4)
    assert f["global"]["worst"] == pytest.approx(0.4)
    assert f["smallest_holdout"] == 10
    assert f["uplink_bytes_per_update"] == pytest.approx(1000.0)


def test_spread_is_mean_p10_and_worst_over_devices_unweighted() -> None:
    values = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    s = spread(values)
    assert s["mean"] == pytest.approx(0.5)
    assert s["p10"] == pytest.approx(0.1)  # 11 values: the 10th percentile is the second lowest
    assert s["worst"] == 0.0 and s["n"] == 11
    # between devices it interpolates linearly, as numpy's default
    twenty = np.linspace(0.5, 1.0, 20).tolist()
    assert spread(twenty)["p10"] == pytest.approx(float(np.percentile(twenty, 10)))
    assert spread(twenty)["p10"] > min(twenty)
    assert spread([]) == {"mean": None, "p10": None, "worst": None, "n": 0}


def test_pooled_accuracy_is_the_last_round_that_evaluated() -> None:
    rounds = [{"accuracy": 0.5}, {"accuracy": 0.6}, {"accuracy": None}]
    assert pooled_accuracy(rounds) == 0.6
    assert pooled_accuracy([]) is None


def test_the_summary_takes_medians_over_seeds_figure_by_figure() -> None:
    by_method = {
        "local": [
            _run([0.90, 0.80], [0.5, 0.5], pooled=0.1),
            _run([0.94, 0.60], [0.5, 0.5], pooled=0.1),
            _run([0.96, 0.70], [0.5, 0.5], pooled=0.1),
        ],
        "finetune": [
            _run([0.95, 0.85], [0.70, 0.40], pooled=0.70),
            _run([0.97, 0.75], [0.80, 0.30], pooled=0.75),
            _run([0.99, 0.80], [0.60, 0.50], pooled=0.72),
        ],
        "ditto": [
            _run([0.99, 0.95], [0.7, 0.4], pooled=0.71),
            _run([0.98, 0.90], [0.7, 0.4], pooled=0.70),
            _run([0.97, 0.97], [0.7, 0.4], pooled=0.69),
        ],
    }
    s = dataset_summary(by_method)
    # FedAvg's global model: the finetune runs' global accuracies on the held-out splits
    assert s["fedavg_from"] == "finetune"
    assert s["fedavg_global_mean"] == pytest.approx(0.55)  # means 0.55, 0.55, 0.55
    assert s["fedavg_worst"] == pytest.approx(0.4)  # worsts 0.4, 0.3, 0.5
    assert s["fedavg_pooled_acc"] == pytest.approx(0.72)
    # local-only: medians of the seeds' means (0.85, 0.77, 0.83) and worsts (0.8, 0.6, 0.7)
    assert s["local_only_mean"] == pytest.approx(0.83)
    assert s["local_only_worst"] == pytest.approx(0.7)
    assert s["finetune_mean"] == pytest.approx(0.895)  # 0.90, 0.86, 0.895
    assert s["finetune_worst"] == pytest.approx(0.8)
    # ditto's means 0.97, 0.94, 0.97 -> 0.97; its worsts 0.95, 0.90, 0.97 -> 0.95
    assert s["best_method"] == "ditto"
    assert s["best_mean"] == pytest.approx(0.97)
    assert s["best_worst"] == pytest.approx(0.95)
    # p10 of two devices: 0.1 of the way from the worse to the better
    assert s["best_p10"] == pytest.approx(0.95 + 0.1 * (0.99 - 0.95))
    assert s["best_over_fedavg_points"] == pytest.approx(42.0)
    assert s["best_over_local_points"] == pytest.approx(14.0)
    assert s["best_worst_holds"] is True
    assert set(s["methods"]) == {"local", "finetune", "ditto"}
    assert s["methods"]["local"]["pooled_acc"] == pytest.approx(0.1)
    assert s["smallest_holdout"] == 10
    assert all(targets_met(s).values())


def test_local_only_is_never_the_best_method() -> None:
    s = dataset_summary(
        {
            "local": [_run([1.0, 1.0], [0.5, 0.5])],
            "finetune": [_run([0.8, 0.6], [0.5, 0.3])],
            "fedper": [_run([0.95, 0.55], [0.5, 0.3])],
        }
    )
    assert s["best_method"] == "fedper"
    assert s["best_over_local_points"] == pytest.approx(-25.0)
    # fedper's worst (0.55) is under local-only's (1.0): the worst-device target fails
    assert s["best_worst_holds"] is False
    met = targets_met(s)
    assert list(met.values()) == [True, False, False]


def test_without_finetune_fedavg_comes_from_a_method_that_trains_it_or_is_unknown() -> None:
    s = dataset_summary({"ditto": [_run([0.9, 0.8], [0.6, 0.4])]})
    assert s["fedavg_from"] == "ditto" and s["fedavg_global_mean"] == pytest.approx(0.5)
    s = dataset_summary(
        {"apfl": [_run([0.9, 0.8], [0.7, 0.5])], "local": [_run([0.9, 0.8], [0.6, 0.4])]}
    )
    assert s["fedavg_from"] == "local" and s["fedavg_global_mean"] == pytest.approx(0.5)
    s = dataset_summary({"fedrep": [_run([0.9, 0.8], [0.6, 0.4])]})
    assert s["fedavg_from"] is None and s["fedavg_global_mean"] is None
    assert s["best_method"] == "fedrep" and s["best_over_fedavg_points"] is None
    assert s["local_only_mean"] is None and s["best_worst_holds"] is None
    assert all(v is None for v in targets_met(s).values())


# --- the data the benchmark runs on ------------------------------------------------------------


def _data_config(name: str, seed: int) -> DataConfig:
    # only [data]: this holds whether or not the rest of the config knows [personal] yet
    data = tomllib.loads(DATASETS[name].read_text())["data"]
    return DataConfig(**{**data, "seed": seed})


@pytest.mark.parametrize("name", ["digits", "fmnist"])
def test_every_device_keeps_five_held_out_samples_at_alpha_0_1(name: str) -> None:
    if name == "fmnist":
        require_installed(
            (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
            "Fashion-MNIST",
            "run `make setup` or `sudo apt-get install dataset-fashion-mnist`",
        )
    holdout = tomllib.loads(DATASETS[name].read_text())["personal"]["holdout"]
    for seed in range(3):  # the benchmark's seeds
        d = _data_config(name, seed)
        assert d.alpha == 0.1 and d.partition == "dirichlet"
        train, _ = load_split(d)
        parts = partition(train.y, 20, d.partition, d.alpha, d.seed, d.min_samples)
        sizes = [len(p) for p in parts]
        assert sum(sizes) == len(train)
        assert min(sizes) >= d.min_samples
        assert min(int(holdout * n) for n in sizes) >= 5
        # the skew is real: most devices hold few of the ten classes
        classes = sorted(len(np.unique(train.y[p])) for p in parts)
        assert classes[len(classes) // 2] <= 5, classes


@pytest.mark.skipif(
    not hasattr(edgefl.config, "PersonalConfig"), reason="[personal] is not in this branch yet"
)
def test_a_seed_sets_the_run_seed_the_partition_and_the_method() -> None:
    from benchmarks.b8_personal import config_for

    for name in DATASETS:
        cfg = config_for(name, "ditto", 2, rounds=3)
        assert cfg.seed == 2 and cfg.data.seed == 2
        assert cfg.personal.method == "ditto"
        assert cfg.rounds.rounds == 3
        assert cfg.rounds.participants == 0  # every device reports every round
        assert 0 < cfg.personal.holdout < 1


def test_a_setting_of_a_sweep_overrides_the_config_as_toml() -> None:
    import benchmarks.b8_personal as b8

    assert parse_setting("personal.ditto_lambda=0.5") == {"personal": {"ditto_lambda": 0.5}}
    assert parse_setting("personal.holdout_split = 'latest'") == {
        "personal": {"holdout_split": "latest"}
    }
    for bad in ("personal.ditto_lambda", "personal.epochs=three", ".x=1"):
        with pytest.raises(ValueError):
            parse_setting(bad)
    in_file = b8.config_for("digits", "ditto", 1, None).personal.epochs
    settings = parse_setting(f"personal.epochs={in_file + 2}")
    cfg = b8.config_for("digits", "ditto", 1, None, settings)
    assert (cfg.personal.epochs, cfg.personal.method, cfg.seed) == (in_file + 2, "ditto", 1)
    assert b8.config_for("digits", "ditto", 1, None).personal.epochs == in_file
