"""Partitioners: how a training set is spread over a simulated fleet.

Each returns one sorted int64 index array per device; together they use every sample once.

- ``dirichlet``: label skew, each class spread in Dirichlet(alpha) proportions (Hsu et al. 2019,
  "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification"). B1 uses alpha 0.5 over 20 devices, seed 0, at least 10 samples per device.
- ``iid``: shuffled and dealt out evenly.
- ``shards``: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
  Decentralized Data" (section 3, pathological non-IID): sorted by label, cut into equal shards,
  two shards per device.
- ``natural``: one device per subject, for data sets that record who each sample came from.
"""

from __future__ import annotations

import numpy as np

from edgefl.config import PARTITIONS


def dirichlet_partition(
    y: np.ndarray, num_devices: int, alpha: float, seed: int = 0, min_samples: int = 10
) -> list[np.ndarray]:
    """Label-skewed split: each class's samples go to devices in Dirichlet(alpha) proportions.

    Redraws until every device holds at least ``min_samples`` (the usual protocol, e.g. Hsu et
    al. 2019, "Measuring the Effects of Non-Identical Data Distribution").
    """
    if num_devices < 1:
        raise ValueError("need at least one device")
    if num_devices * min_samples > len(y):
        raise ValueError(f"{len(y)} samples cannot give {num_devices} devices {min_samples} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _attempt in range(10_000):
        parts: list[list[int]] = [[] for _ in range(num_devices)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            share = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(share) * len(idx)).astype(int)[:-1]
            for dev, chunk in enumerate(np.split(idx, cuts)):
                parts[dev].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise RuntimeError(
        f"no Dirichlet(alpha={alpha}) draw gave every device {min_samples} samples; "
        "raise alpha or lower min_samples"
    )


def iid_partition(n: int, num_devices: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and deal out evenly."""
    if num_devices < 1 or num_devices > n:
        raise ValueError(f"cannot deal {n} samples to {num_devices} devices")
    idx = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(idx, num_devices)]


def shard_partition(
    y: np.ndarray, num_devices: int, shards_per_device: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """McMahan et al. 2017's pathological non-IID split: sort the samples by label, cut them
    into ``num_devices * shards_per_device`` shards of equal size (sizes differ by at most one
    when they do not divide evenly), and give each device ``shards_per_device`` of them at
    random. With two shards per device most devices hold two labels, some one.

    Within a label the order is shuffled (seeded), so a shard is a random sample of its label
    rather than whatever order the source file had.
    """
    if num_devices < 1 or shards_per_device < 1:
        raise ValueError("need at least one device and one shard per device")
    shards = num_devices * shards_per_device
    if shards > len(y):
        raise ValueError(
            f"{len(y)} samples cannot be cut into {shards} shards "
            f"({num_devices} devices x {shards_per_device})"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]
    pieces = np.array_split(order, shards)
    deal = rng.permutation(shards).reshape(num_devices, shards_per_device)
    return [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in deal]


def natural_partition(subjects: np.ndarray | None, num_devices: int) -> list[np.ndarray]:
    """One device per subject, in the order of the subjects' ids: the split a fleet of real
    wearers has, where every device's data differ by person (gait, strength, how the watch sits)
    rather than by a synthetic label skew."""
    if subjects is None:
        raise ValueError(
            "the natural partition needs a data set that records who each sample came from "
            "(the watch set does); this one has no subjects: use dirichlet, iid or shards"
        )
    ids = np.unique(subjects)
    if num_devices != len(ids):
        raise ValueError(
            f"the natural partition gives one device per subject: the training set has "
            f"{len(ids)} subjects ({', '.join(str(s) for s in ids)}), so it needs {len(ids)} "
            f"devices, not {num_devices}"
        )
    return [np.flatnonzero(subjects == s).astype(np.int64) for s in ids]


def partition(
    y: np.ndarray,
    num_devices: int,
    kind: str,
    alpha: float,
    seed: int,
    min_samples: int,
    *,
    subjects: np.ndarray | None = None,
    shards_per_device: int = 2,
) -> list[np.ndarray]:
    """Split by ``kind`` (one of :data:`PARTITIONS`); ``subjects`` is needed for ``natural``."""
    if kind == "dirichlet":
        return dirichlet_partition(y, num_devices, alpha, seed, min_samples)
    if kind == "iid":
        return iid_partition(len(y), num_devices, seed)
    if kind == "shards":
        parts = shard_partition(y, num_devices, shards_per_device, seed)
    elif kind == "natural":
        parts = natural_partition(subjects, num_devices)
    else:
        raise ValueError(f"unknown partition {kind!r}: use one of {', '.join(PARTITIONS)}")
    smallest = min(len(p) for p in parts)
    if smallest < min_samples:
        raise ValueError(
            f"the {kind} partition leaves a device {smallest} samples, fewer than min_samples "
            f"({min_samples})"
        )
    return parts
