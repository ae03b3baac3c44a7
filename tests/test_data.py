"""Data (edgefl/data/): the digits split of B1, the partitioners that spread a training set over
a fleet, the [data] configuration and the local run's data preparation, and the checked loader a
device uses for the .npz file it holds. Fashion-MNIST: test_data_idx.py; the watch set:
test_data_watch.py."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from edgefl.config import ConfigError, DataConfig, RunConfig, load
from edgefl.data import (
    Dataset,
    PartitionError,
    dirichlet_partition,
    iid_partition,
    load_digits_split,
    load_npz,
    load_split,
    natural_partition,
    partition,
    save_npz,
    shard_partition,
)
from edgefl.data.fashion_mnist import fashion_mnist_dir
from edgefl.data.watch import ENV_PATH
from edgefl.data.watch_setup import convert_watch_pickle, write_watch_npz
from launch.local import prepare_data
from tests.data_sets import pickled_npy, require_installed, watch_dict

DEVICES = 20


@pytest.fixture(scope="module")
def split() -> tuple[Dataset, Dataset]:
    return load_digits_split()


@pytest.fixture(scope="module")
def y_train(split) -> np.ndarray:
    return split[0].y


def label_skew(y: np.ndarray, parts: list[np.ndarray], classes: int = 10) -> float:
    """Mean total-variation distance between each device's class mix and the whole set's."""
    overall = np.bincount(y, minlength=classes) / len(y)
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(y[p], minlength=classes) / len(p) - overall).sum()
                for p in parts
            ]
        )
    )


def assert_covers_once(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no repeats


# ---------------------------------------------------------------------------------------------
# the digits split


def test_digits_split_sizes(split):
    train, test = split
    assert (len(train), len(test)) == (1437, 360)
    assert train.X.shape == (1437, 64) and test.X.shape == (360, 64)


def test_digits_features_are_float32_in_unit_range(split):
    for part in split:
        assert part.X.dtype == np.float32
        assert part.X.min() == 0.0 and part.X.max() == 1.0
        assert part.y.dtype == np.int64
        assert set(np.unique(part.y)) == set(range(10))


def test_digits_split_is_stratified(split):
    train, test = split
    counts_train = np.bincount(train.y, minlength=10)
    counts_test = np.bincount(test.y, minlength=10)
    total = counts_train + counts_test
    assert total.sum() == 1797
    # every class keeps its share in the test set, to within one sample
    assert np.all(np.abs(counts_test - 0.2 * total) <= 1), (counts_test, total)


def test_digits_split_is_deterministic_per_seed(split):
    train, test = split
    train2, test2 = load_digits_split()
    np.testing.assert_array_equal(train.X, train2.X)
    np.testing.assert_array_equal(test.y, test2.y)
    other_train, _ = load_digits_split(seed=1)
    assert not np.array_equal(train.y, other_train.y)


# ---------------------------------------------------------------------------------------------
# Dirichlet partition


def test_dirichlet_covers_every_index_exactly_once(y_train):
    parts = dirichlet_partition(y_train, DEVICES, alpha=0.5, seed=0)
    assert len(parts) == DEVICES
    assert_covers_once(parts, len(y_train))


@pytest.mark.parametrize(("alpha", "min_samples"), [(0.5, 10), (0.5, 40), (0.1, 10)])
def test_dirichlet_respects_min_samples(y_train, alpha, min_samples):
    parts = dirichlet_partition(y_train, DEVICES, alpha, seed=3, min_samples=min_samples)
    assert min(len(p) for p in parts) >= min_samples
    assert_covers_once(parts, len(y_train))


def test_dirichlet_is_deterministic_per_seed(y_train):
    a = dirichlet_partition(y_train, DEVICES, 0.5, seed=0)
    b = dirichlet_partition(y_train, DEVICES, 0.5, seed=0)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)


def test_dirichlet_differs_across_seeds(y_train):
    a = dirichlet_partition(y_train, DEVICES, 0.5, seed=0)
    b = dirichlet_partition(y_train, DEVICES, 0.5, seed=1)
    assert [len(p) for p in a] != [len(p) for p in b]


def test_dirichlet_alpha_controls_label_skew(y_train):
    skewed = [label_skew(y_train, dirichlet_partition(y_train, DEVICES, 0.5, s)) for s in (0, 1)]
    mixed = [label_skew(y_train, dirichlet_partition(y_train, DEVICES, 1000.0, s)) for s in (0, 1)]
    # measured: ~0.45 at alpha 0.5, ~0.02 at alpha 1000 (the whole set's mix on every device)
    assert min(skewed) > 0.3, skewed
    assert max(mixed) < 0.06, mixed
    # at alpha 0.5 most devices lack some class entirely; at alpha 1000 none does
    parts = dirichlet_partition(y_train, DEVICES, 0.5, seed=0)
    assert sum(len(np.unique(y_train[p])) < 10 for p in parts) >= DEVICES // 2
    parts = dirichlet_partition(y_train, DEVICES, 1000.0, seed=0)
    assert all(len(np.unique(y_train[p])) == 10 for p in parts)


def test_dirichlet_refuses_impossible_requests(y_train):
    with pytest.raises(ValueError, match="at least one device"):
        dirichlet_partition(y_train, 0, 0.5)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(y_train, 200, 0.5, min_samples=10)


def test_dirichlet_gives_up_with_a_hint():
    # feasible in count (2 x 10 of 20) but a near-degenerate Dirichlet never splits evenly
    with pytest.raises(PartitionError, match="raise alpha"):
        dirichlet_partition(np.zeros(20, dtype=np.int64), 2, alpha=1e-6, min_samples=10)


# ---------------------------------------------------------------------------------------------
# IID partition and the dispatcher


def test_iid_partition_deals_evenly(y_train):
    parts = iid_partition(len(y_train), DEVICES, seed=0)
    assert_covers_once(parts, len(y_train))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # shuffled, not contiguous blocks
    assert any(p[-1] - p[0] >= len(p) for p in parts)


def test_iid_partition_is_deterministic_per_seed():
    a, b, c = (iid_partition(100, 7, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_partition_class_mix_is_close_to_the_whole(y_train):
    parts = iid_partition(len(y_train), DEVICES, seed=0)
    skewed = dirichlet_partition(y_train, DEVICES, 0.5, seed=0)
    assert label_skew(y_train, parts) < 0.5 * label_skew(y_train, skewed)


@pytest.mark.parametrize(("n", "devices"), [(10, 0), (10, 11)])
def test_iid_partition_refuses_impossible_requests(n, devices):
    with pytest.raises(ValueError, match="cannot deal"):
        iid_partition(n, devices)


def test_partition_dispatches_by_kind(y_train):
    d = partition(y_train, 5, "dirichlet", alpha=0.5, seed=2, min_samples=10)
    expected = dirichlet_partition(y_train, 5, 0.5, seed=2, min_samples=10)
    assert all(np.array_equal(a, b) for a, b in zip(d, expected, strict=True))
    i = partition(y_train, 5, "iid", alpha=0.5, seed=2, min_samples=10)
    assert all(
        np.array_equal(a, b) for a, b in zip(i, iid_partition(len(y_train), 5, 2), strict=True)
    )
    with pytest.raises(ValueError, match="unknown partition 'bogus': use one of dirichlet, iid"):
        partition(y_train, 5, "bogus", alpha=0.5, seed=2, min_samples=10)


# ---------------------------------------------------------------------------------------------
# McMahan's shards


def label_pure(classes: int = 10, per_class: int = 100) -> np.ndarray:
    """Labels whose shards (10 devices x 2 of 50) each hold one label; shuffled order."""
    return np.random.default_rng(5).permutation(np.repeat(np.arange(classes), per_class))


def test_shards_give_every_device_two_label_pure_shards():
    y = label_pure()
    parts = shard_partition(y, 10, shards_per_device=2, seed=0)
    assert_covers_once(parts, len(y))
    for p in parts:
        counts = np.bincount(y[p], minlength=10)
        # two shards of 50 samples, each of a single label: 100 samples, counts in units of 50
        assert len(p) == 100 and set(counts.tolist()) <= {0, 50, 100}
        assert 1 <= np.count_nonzero(counts) <= 2
    # devices differ: not every device holds the same pair
    assert len({tuple(np.flatnonzero(np.bincount(y[p], minlength=10))) for p in parts}) > 3


@pytest.mark.parametrize("per_device", [1, 3, 5])
def test_shards_per_device_sets_labels_per_device(per_device):
    y = label_pure(classes=10, per_class=10 * per_device)  # 10 devices x per_device shards of 10
    parts = shard_partition(y, 10, shards_per_device=per_device, seed=1)
    assert_covers_once(parts, len(y))
    for p in parts:
        assert len(p) == 10 * per_device
        assert np.count_nonzero(np.bincount(y[p], minlength=10)) <= per_device


def test_shards_on_uneven_counts_use_every_sample(y_train):
    parts = shard_partition(y_train, DEVICES, seed=0)  # 1437 samples into 40 shards of 35-36
    assert_covers_once(parts, len(y_train))
    assert {len(p) for p in parts} <= {70, 71, 72}
    # shards are much more skewed than Dirichlet(0.5)
    assert max(np.count_nonzero(np.bincount(y_train[p])) for p in parts) <= 4
    assert label_skew(y_train, parts) > label_skew(
        y_train, dirichlet_partition(y_train, DEVICES, 0.5, seed=0)
    )


def test_shards_shuffle_within_a_label_and_follow_the_seed():
    y = np.zeros(200, dtype=np.int64)  # one label: the shards are random samples of it
    a, b, c = (shard_partition(y, 5, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))
    assert any(p[-1] - p[0] >= len(p) for p in a)  # not contiguous runs of the file


def test_shards_refuse_impossible_requests():
    with pytest.raises(ValueError, match="cannot be cut into 22 shards"):
        shard_partition(np.zeros(21, dtype=np.int64), 11)
    with pytest.raises(ValueError, match="one shard per device"):
        shard_partition(np.zeros(21, dtype=np.int64), 2, shards_per_device=0)


# ---------------------------------------------------------------------------------------------
# natural (by subject)


def test_natural_gives_one_device_per_subject_in_id_order():
    subjects = np.array([3, 1, 1, 7, 3, 3, 7, 1])
    parts = natural_partition(subjects, 3)
    assert [p.tolist() for p in parts] == [[1, 2, 7], [0, 4, 5], [3, 6]]
    assert all(p.dtype == np.int64 for p in parts)


def test_natural_refuses_a_device_count_other_than_the_subjects():
    with pytest.raises(ValueError, match=r"3 subjects \(1, 3, 7\), so it needs 3 devices, not 4"):
        natural_partition(np.array([3, 1, 7]), 4)


def test_natural_refuses_a_dataset_without_subjects(y_train):
    with pytest.raises(ValueError, match="records who each sample came from"):
        partition(y_train, 5, "natural", 0.5, 0, 10)


def test_partition_dispatches_shards_and_natural(y_train):
    got = partition(y_train, 5, "shards", 0.5, 2, 10, shards_per_device=3)
    expected = shard_partition(y_train, 5, 3, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    subjects = np.arange(len(y_train)) % 4
    got = partition(y_train, 4, "natural", 0.5, 2, 10, subjects=subjects)
    assert [int(subjects[p[0]]) for p in got] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="leaves a device 2 samples, fewer than min_samples"):
        partition(np.zeros(8, np.int64), 4, "natural", 0.5, 0, 3, subjects=np.arange(8) // 2)


# ---------------------------------------------------------------------------------------------
# [data] and the local run's data preparation


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"dataset": "mnist"}, "data.dataset 'mnist' is not one of digits, fashion_mnist, watch"),
        ({"partition": "pathological"}, "is not one of dirichlet, iid, shards, natural"),
        ({"partition": "natural"}, "digits records none: use it with dataset 'watch'"),
        ({"dataset": "fashion_mnist", "partition": "natural"}, "fashion_mnist records none"),
        ({"train_samples": 100}, "apply to fashion_mnist only"),
        ({"dataset": "fashion_mnist", "test_samples": -1}, "must be >= 0"),
        ({"shards_per_device": 0}, "shards_per_device >= 1"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"test_fraction": 1.0}, r"test_fraction must lie in \(0, 1\)"),
        ({"dataset": "watch", "test_subjects": []}, "one or more distinct subjects"),
        ({"dataset": "watch", "test_subjects": [9, 9]}, "one or more distinct subjects"),
    ],
)
def test_data_config_refuses_unknown_values(values, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**values)


def test_data_config_from_toml_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\ndataset = "watch"\npartition = "natural"\ntest_subjects = [2]\n')
    cfg = load(RunConfig, path)
    assert (cfg.data.dataset, cfg.data.partition, cfg.data.test_subjects) == (
        "watch",
        "natural",
        [2],
    )
    path.write_text('[data]\ndataset = "cifar10"\n')
    with pytest.raises(ConfigError, match=r"run.toml: data.dataset 'cifar10' is not one of"):
        load(RunConfig, path)
    path.write_text('[data]\ntest_subjects = ["nine"]\n')
    with pytest.raises(ConfigError, match=r"data.test_subjects\[0\] should be int"):
        load(RunConfig, path)


def test_load_split_picks_the_dataset_by_name(split):
    train, test = load_split(DataConfig())
    np.testing.assert_array_equal(train.X, split[0].X)
    np.testing.assert_array_equal(test.y, split[1].y)


@pytest.fixture
def small_watch(tmp_path, monkeypatch):
    """A converted stand-in for the watch set, 4 subjects, where the run-time loader looks."""
    npy, sha = pickled_npy(watch_dict(subjects=4))
    path = write_watch_npz(convert_watch_pickle(npy, sha), tmp_path / "watch.npz")
    monkeypatch.setenv(ENV_PATH, str(path))
    return path


def run_config(devices: int, **data) -> RunConfig:
    cfg = RunConfig(data=DataConfig(**data))
    cfg.demo.devices = devices
    return cfg


def ids(n: int) -> list[str]:
    return [f"dev-{i:02d}" for i in range(n)]


def test_prepare_data_natural_gives_each_wearer_a_device(small_watch, tmp_path):
    cfg = run_config(3, dataset="watch", partition="natural", test_subjects=[2], min_samples=1)
    sizes = prepare_data(cfg, tmp_path / "data", ids(3))
    manifest = json.loads((tmp_path / "data" / "partition.json").read_text())
    assert manifest["test_subjects"] == [2]
    assert [manifest["devices"][d]["subjects"] for d in ids(3)] == [[1], [3], [4]]
    assert manifest["features"] == 600 and manifest["classes"] == 7
    for d in ids(3):
        held = load_npz(tmp_path / "data" / f"{d}.npz", features=600, classes=7)
        assert len(held) == sizes[d] == manifest["devices"][d]["samples"]
        assert sorted(set(held.y.tolist())) == list(range(7))  # every wearer did every exercise
    test = load_npz(tmp_path / "data" / "test.npz")
    assert len(test) == manifest["test_samples"]
    assert sum(sizes.values()) == manifest["train_samples"]


def test_prepare_data_natural_says_how_many_devices(small_watch, tmp_path):
    cfg = run_config(20, dataset="watch", partition="natural", test_subjects=[2, 3])
    with pytest.raises(
        ConfigError,
        match=r"has 2 wearers \(subjects \[1, 4\]; \[2, 3\] are held out .*"
        r"set demo.devices = 2, not 20",
    ):
        prepare_data(cfg, tmp_path / "data", ids(20))


def test_prepare_data_watch_with_label_skew(small_watch, tmp_path):
    cfg = run_config(5, dataset="watch", partition="dirichlet", test_subjects=[4], min_samples=5)
    sizes = prepare_data(cfg, tmp_path / "data", ids(5))
    assert len(sizes) == 5 and min(sizes.values()) >= 5


def test_prepare_data_digits_shards(tmp_path):
    cfg = run_config(DEVICES, partition="shards")
    sizes = prepare_data(cfg, tmp_path / "data", ids(DEVICES))
    assert sum(sizes.values()) == 1437
    manifest = json.loads((tmp_path / "data" / "partition.json").read_text())
    assert "test_subjects" not in manifest
    assert all(np.count_nonzero(v["per_class"]) <= 4 for v in manifest["devices"].values())


def test_prepare_data_fashion_mnist_subset(tmp_path):
    require_installed(
        (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST",
        "run `make setup` or `sudo apt-get install dataset-fashion-mnist`",
    )
    cfg = run_config(
        DEVICES, dataset="fashion_mnist", partition="shards", train_samples=2000, test_samples=500
    )
    sizes = prepare_data(cfg, tmp_path / "data", ids(DEVICES))
    assert set(sizes.values()) == {100}
    held = load_npz(tmp_path / "data" / "dev-00.npz", features=784, classes=10)
    assert np.count_nonzero(np.bincount(held.y, minlength=10)) <= 2
    assert len(load_npz(tmp_path / "data" / "test.npz", features=784)) == 500


# ---------------------------------------------------------------------------------------------
# the .npz a device holds


def small_dataset(n: int = 30, features: int = 64) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        rng.random((n, features), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)
    )


def test_save_and_load_round_trip(tmp_path):
    data = small_dataset()
    path = tmp_path / "deep" / "dir" / "data.npz"  # parents are created
    save_npz(path, data)
    got = load_npz(path, features=64, classes=10)
    assert got.X.dtype == np.float32 and got.y.dtype == np.int64
    np.testing.assert_array_equal(got.X, data.X)
    np.testing.assert_array_equal(got.y, data.y)
    assert len(got) == 30
    assert os.listdir(path.parent) == ["data.npz"]  # no temporary file left behind


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "data.npz"
    save_npz(path, small_dataset(n=30))
    save_npz(path, small_dataset(n=12))
    assert len(load_npz(path)) == 12


def test_load_accepts_other_integer_label_types(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((3, 4), np.float64), y=np.array([0, 1, 2], np.uint8))
    got = load_npz(path, features=4, classes=3)
    assert got.X.dtype == np.float32 and got.y.dtype == np.int64


def test_load_missing_file_says_which(tmp_path):
    path = tmp_path / "nowhere.npz"
    with pytest.raises(FileNotFoundError, match="nowhere.npz does not exist"):
        load_npz(path)


def write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


X_OK = np.zeros((5, 64), np.float32)
Y_OK = np.arange(5, dtype=np.int64)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"X": X_OK}, r"missing arrays \['y'\]"),
        ({"y": Y_OK}, r"missing arrays \['X'\]"),
        ({"features": X_OK, "labels": Y_OK}, r"missing arrays \['X', 'y'\]"),
        ({"X": np.zeros(5, np.float32), "y": Y_OK}, "X must be"),
        ({"X": np.zeros((5, 8, 8), np.float32), "y": Y_OK}, "X must be"),
        ({"X": X_OK, "y": Y_OK.reshape(5, 1)}, "X must be"),
        ({"X": X_OK, "y": Y_OK[:4]}, "X must be"),
        ({"X": X_OK[:0], "y": Y_OK[:0]}, "no samples"),
        ({"X": X_OK, "y": Y_OK.astype(np.float32)}, "integer class labels"),
        ({"X": X_OK, "y": Y_OK > 2}, "integer class labels"),
        ({"X": X_OK, "y": np.array(list("abcde"))}, "integer class labels"),
    ],
    ids=[
        "no-y",
        "no-X",
        "neither",
        "X-1d",
        "X-3d",
        "y-2d",
        "lengths",
        "empty",
        "float-labels",
        "bool-labels",
        "str-labels",
    ],
)
def test_load_rejects_bad_arrays(tmp_path, arrays, match):
    path = write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz(path, features=64, classes=10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_rejects_non_finite_features(tmp_path, bad):
    X = X_OK.copy()
    X[3, 17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_npz(write(tmp_path / "d.npz", X=X, y=Y_OK))


def test_load_rejects_the_wrong_feature_count(tmp_path):
    path = write(tmp_path / "d.npz", X=np.zeros((5, 784), np.float32), y=Y_OK)
    with pytest.raises(ValueError, match="784 features, the model takes 64"):
        load_npz(path, features=64)
    assert load_npz(path, features=784).X.shape == (5, 784)


@pytest.mark.parametrize("label", [-1, 10, 255])
def test_load_rejects_labels_out_of_range(tmp_path, label):
    y = Y_OK.copy()
    y[0] = label
    path = write(tmp_path / "d.npz", X=X_OK, y=y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        load_npz(path, classes=10)


class _Trap:
    """Unpickling this creates a directory: proof that the loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_load_refuses_pickled_object_arrays_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    X = np.empty(1, dtype=object)
    X[0] = _Trap(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, X=X, y=np.array([0]))  # np.savez pickles object arrays
    assert pickle.loads(pickle.dumps(_Trap(tmp_path / "check"))) is None  # the trap works
    assert (tmp_path / "check").is_dir()
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"not an npz at all", b"PK\x03\x04truncated zip", b"\x93NUMPY"],
    ids=["empty", "text", "bad-zip", "bad-npy"],
)
def test_load_refuses_files_that_are_not_npz(tmp_path, content):
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        load_npz(path)


def test_load_refuses_a_bare_npy_array(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, X_OK)
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_npz(path)


def test_prepare_data_names_the_settings_when_the_fleet_is_too_large(tmp_path):
    # 1,437 training digits cannot give 3 devices 500 each: one line naming the run's keys,
    # not a traceback from inside the partitioner
    cfg = run_config(3, partition="iid", min_samples=500)
    with pytest.raises(ConfigError, match=r"use at most 2 devices.*demo\.devices = 3"):
        prepare_data(cfg, tmp_path / "data", ids(3))
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_iid_partition_keeps_the_minimum_per_device(y_train):
    with pytest.raises(PartitionError, match="at least 100 each: use at most 14 devices"):
        partition(y_train, 15, "iid", 0.5, 0, 100)
    assert min(len(p) for p in partition(y_train, 14, "iid", 0.5, 0, 100)) >= 100
