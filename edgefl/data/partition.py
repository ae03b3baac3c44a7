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


class PartitionError(ValueError):
    """The data set cannot be spread as asked (too few samples for the devices, a draw that
    cannot give every device its minimum); the message says which setting to change. Callers
    name their own knobs: the demo's ``[data]`` keys, ``edgefl split``'s options."""


# Draws tried before the Dirichlet partition gives up (about 0.3 ms each for 10 classes).
DIRICHLET_ATTEMPTS = 10_000


def dirichlet_partition(
    y: np.ndarray, num_devices: int, alpha: float, seed: int = 0, min_samples: int = 10
) -> list[np.ndarray]:
    """Label-skewed split: each class's samples go to devices in Dirichlet(alpha) proportions.

    Redraws until every device holds at least ``min_samples`` (the usual protocol, e.g. Hsu et
    al. 2019, "Measuring the Effects of Non-Identical Data Distribution").
    """
    if num_devices < 1:
        raise PartitionError("need at least one device")
    _check_enough(len(y), num_devices, min_samples)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _attempt in range(DIRICHLET_ATTEMPTS):
        # Count first and build the index lists only for the draw that is kept: most draws of
        # a large fleet fail, and building their lists made failing take a minute.
        shuffled, cuts = [], []
        for members in by_class:
            idx = members.copy()
            rng.shuffle(idx)
            share = rng.dirichlet(np.full(num_devices, alpha))
            shuffled.append(idx)
            cuts.append((np.cumsum(share) * len(idx)).astype(int)[:-1])
        bounds = np.column_stack(
            [np.zeros(len(cuts), dtype=int), np.array(cuts), [len(i) for i in shuffled]]
        )
        if np.diff(bounds, axis=1).sum(axis=0).min() >= min_samples:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
            for idx, c in zip(shuffled, cuts, strict=True):
                for dev, chunk in enumerate(np.split(idx, c)):
                    parts[dev].append(chunk)
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise PartitionError(
        f"no Dirichlet(alpha={alpha:g}) draw of {DIRICHLET_ATTEMPTS:,} gave each of {num_devices} "
        f"devices at least {min_samples} of the {len(y):,} samples: raise alpha (e.g. "
        f"{_larger_alpha(alpha):g}; larger is closer to an even split), lower the minimum per "
        f"device, use fewer devices, or the iid partition"
    )


def _larger_alpha(alpha: float) -> float:
    """A value to suggest: ten times larger, at least 1 (a Dirichlet(1) is uniform on the
    simplex, and devices rarely come out nearly empty)."""
    return max(1.0, 10 * alpha)


def _check_enough(n: int, num_devices: int, min_samples: int) -> None:
    if num_devices * max(min_samples, 1) > n:
        most = n // max(min_samples, 1)
        raise PartitionError(
            f"{n:,} samples cannot give {num_devices} devices at least {max(min_samples, 1)} "
            f"each: use at most {most} devices, or lower the minimum per device"
        )


def iid_partition(n: int, num_devices: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and deal out evenly."""
    if num_devices < 1 or num_devices > n:
        raise PartitionError(f"cannot deal {n:,} samples to {num_devices} devices")
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
        raise PartitionError("need at least one device and one shard per device")
    shards = num_devices * shards_per_device
    if shards > len(y):
        raise PartitionError(
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
        raise PartitionError(
            "the natural partition needs a data set that records who each sample came from "
            "(the watch set does); this one has no subjects: use dirichlet, iid or shards"
        )
    ids = np.unique(subjects)
    if num_devices != len(ids):
        raise PartitionError(
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
        _check_enough(len(y), num_devices, min_samples)
        parts = iid_partition(len(y), num_devices, seed)
    elif kind == "shards":
        parts = shard_partition(y, num_devices, shards_per_device, seed)
    elif kind == "natural":
        parts = natural_partition(subjects, num_devices)
    else:
        raise ValueError(f"unknown partition {kind!r}: use one of {', '.join(PARTITIONS)}")
    smallest = min(len(p) for p in parts)
    if smallest < min_samples:
        raise PartitionError(
            f"the {kind} partition leaves a device {smallest} samples, fewer than min_samples "
            f"({min_samples}): lower the minimum per device, or use fewer devices"
        )
    return parts
