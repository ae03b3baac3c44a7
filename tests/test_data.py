"""Data (edgefl/data.py): the digits split of B1, the partitioners that spread it over a fleet,
and the checked loader a device uses for the .npz file it holds."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from edgefl.data import (
    Dataset,
    dirichlet_partition,
    iid_partition,
    load_digits_split,
    load_npz,
    partition,
    save_npz,
)

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
    with pytest.raises(RuntimeError, match="raise alpha"):
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
