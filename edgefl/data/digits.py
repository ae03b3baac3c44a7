"""scikit-learn's bundled digits: 1,797 real 8x8 handwritten digits, no download.

The B1 protocol of docs/benchmarks.md: digits / 16, stratified 80/20 split with
``random_state=0``.
"""

from __future__ import annotations

import numpy as np

from edgefl.data.dataset import Dataset


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train and test splits of the 1,797 8x8 digits, features scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return Dataset(X_tr, y_tr), Dataset(X_te, y_te)
