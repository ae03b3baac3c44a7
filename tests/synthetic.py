"""Small learnable stand-ins for the convolutional models' data, made in memory in milliseconds:
tests of the models, their ONNX export and serving need data with structure (so that a model
trains, and int8 predictions can be compared with fp32 ones where they are not coin flips),
not the real data sets."""

from __future__ import annotations

import numpy as np

from edgefl.data import Dataset


def images(samples: int, seed: int = 0, classes: int = 10) -> Dataset:
    """28x28 images in [0, 1], flat (784 features, row-major) as every edgefl data set: faint
    noise with a bright 7x7 square whose place on a 4x4 grid is the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, samples)
    X = rng.random((samples, 28, 28), dtype=np.float32) * 0.3
    for i, c in enumerate(y):
        r, k = divmod(int(c), 4)
        X[i, 7 * r : 7 * r + 7, 7 * k : 7 * k + 7] += 0.7
    return Dataset(X.reshape(samples, 784), y.astype(np.int64))


def windows(samples: int, seed: int = 0, classes: int = 7) -> Dataset:
    """Sensor windows of 6 channels x 100 steps, flat (600 features, channel-major) as the
    watch data: noise plus a sine on one channel whose frequency and channel are the class,
    starting anywhere in the window."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, samples)
    X = rng.normal(0.0, 0.3, (samples, 6, 100)).astype(np.float32)
    t = np.arange(100) / 50.0  # 50 Hz
    for i, c in enumerate(y):
        X[i, int(c) % 6] += np.sin(2 * np.pi * (1 + int(c)) * t + rng.uniform(0, 2 * np.pi))
    return Dataset(X.reshape(samples, 600), y.astype(np.int64))


def for_model(name: str, samples: int, seed: int = 0) -> Dataset:
    return {"cnn_fmnist": images, "cnn_watch": windows}[name](samples, seed)
