"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms"): 70,000 28x28 grey-scale images of clothing, 10
classes, the official split of 60,000 training and 10,000 test images.

It comes from Debian's ``dataset-fashion-mnist`` package (the four IDX files, gzipped, under
/usr/share/datasets/fashion-mnist/), which ``make setup`` installs with apt; nothing is
downloaded at run time and nothing is cached: the files are read and checked on every load
(about a second). ``EDGEFL_FASHION_MNIST_DIR`` points elsewhere, e.g. on a system without apt.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgefl.data.dataset import DataMissingError, Dataset
from edgefl.data.idx import read_idx

PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "EDGEFL_FASHION_MNIST_DIR"
SIDE = 28
CLASSES = 10
LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# part -> (images file, labels file, samples)
PARTS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}


def fashion_mnist_dir() -> Path:
    """Where the IDX files are: ``$EDGEFL_FASHION_MNIST_DIR``, else Debian's location."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _find(directory: Path, name: str) -> Path:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise DataMissingError(
        f"Fashion-MNIST is not installed: {directory} has no {name}.gz (nor {name}). Install "
        f"it with `sudo apt-get install {PACKAGE}` (`make setup` does), or set {ENV_DIR} to a "
        "folder holding the four IDX files"
    )


def load_fashion_mnist(part: str, directory: str | Path | None = None) -> Dataset:
    """The ``train`` or ``test`` part, checked: the official count of 28x28 uint8 images and
    labels 0-9. X is float32 in [0, 1] (pixels / 255), flattened to 784 features."""
    if part not in PARTS:
        raise ValueError(f"Fashion-MNIST has parts {', '.join(PARTS)}, not {part!r}")
    directory = Path(directory) if directory is not None else fashion_mnist_dir()
    images_name, labels_name, count = PARTS[part]
    images_path, labels_path = _find(directory, images_name), _find(directory, labels_name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape != (count, SIDE, SIDE):
        raise ValueError(
            f"{images_path}: expected {count} images of {SIDE}x{SIDE} uint8, "
            f"found {images.shape} {images.dtype}"
        )
    if labels.dtype != np.uint8 or labels.shape != (count,):
        raise ValueError(
            f"{labels_path}: expected {count} uint8 labels, found {labels.shape} {labels.dtype}"
        )
    if labels.max() >= CLASSES:
        raise ValueError(f"{labels_path}: labels must lie in [0, {CLASSES}), found {labels.max()}")
    X = images.reshape(count, SIDE * SIDE).astype(np.float32)
    X /= 255.0
    return Dataset(X, labels.astype(np.int64))


def stratified_subset(y: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``size`` samples that keep every class's share (to within one sample),
    drawn at random within each class."""
    if not 0 < size <= len(y):
        raise ValueError(f"cannot take {size} of {len(y)} samples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * size / len(y)
    quota = np.floor(exact).astype(int)
    # the samples that flooring left over go to the classes with the largest remainders
    quota[np.argsort(quota - exact, kind="stable")[: size - quota.sum()]] += 1
    picked = [
        rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def load_fashion_mnist_split(
    train_samples: int = 0,
    test_samples: int = 0,
    seed: int = 0,
    directory: str | Path | None = None,
) -> tuple[Dataset, Dataset]:
    """The official training and test parts; a non-zero ``train_samples`` / ``test_samples``
    keeps a stratified random subset of that size (for a benchmark that cannot afford all)."""
    train = load_fashion_mnist("train", directory)
    test = load_fashion_mnist("test", directory)
    if train_samples:
        idx = stratified_subset(train.y, train_samples, seed)
        train = Dataset(train.X[idx], train.y[idx])
    if test_samples:
        idx = stratified_subset(test.y, test_samples, seed)
        test = Dataset(test.X[idx], test.y[idx])
    return train, test
