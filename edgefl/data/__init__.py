"""Data: the data sets of local runs and benchmarks, the partitioners that spread one over a
simulated fleet, the checked loader a device uses for the data it holds, and the splitting of a
data set (bundled or a user's file) into devices' files (edgefl/data/split.py, `edgefl split`).

Every data set gives X as float32 (samples, features), flat, and y as int64 class labels:

- ``digits``: scikit-learn's 1,797 8x8 digits (edgefl/data/digits.py), 64 features, 10 classes;
- ``fashion_mnist``: Debian's dataset-fashion-mnist (edgefl/data/fashion_mnist.py), 784
  features, 10 classes;
- ``watch``: seglearn's smartwatch exercises, by wearer (edgefl/data/watch.py), 600 features
  (6 channels x 100 readings), 7 classes.
"""

from __future__ import annotations

from edgefl.config import DATASETS, ConfigError, DataConfig
from edgefl.data.dataset import DataMissingError, Dataset, load_npz, save_npz
from edgefl.data.digits import load_digits_split
from edgefl.data.fashion_mnist import load_fashion_mnist, load_fashion_mnist_split
from edgefl.data.partition import (
    PARTITIONS,
    PartitionError,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    partition,
    shard_partition,
)
from edgefl.data.watch import load_watch_split

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "DataMissingError",
    "Dataset",
    "PartitionError",
    "dirichlet_partition",
    "iid_partition",
    "load_digits_split",
    "load_fashion_mnist",
    "load_fashion_mnist_split",
    "load_npz",
    "load_split",
    "load_watch_split",
    "natural_partition",
    "partition",
    "save_npz",
    "shard_partition",
]


def load_split(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The training and test sets that ``[data]`` names."""
    if cfg.dataset == "digits":
        return load_digits_split(cfg.test_fraction, seed=0)
    if cfg.dataset == "fashion_mnist":
        return load_fashion_mnist_split(cfg.train_samples, cfg.test_samples, cfg.seed)
    if cfg.dataset == "watch":
        return load_watch_split(cfg.test_subjects)
    raise ConfigError(f"data.dataset {cfg.dataset!r} is not one of {', '.join(DATASETS)}")
