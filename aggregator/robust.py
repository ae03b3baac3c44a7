"""Aggregation rules that a minority of faulty or hostile devices cannot steer.

Each is an :class:`aggregator.aggregation.Accumulator`, so a round folds updates in the same way
whatever the rule:

- ``mean``: the sample-weighted mean (FedAvg; McMahan et al. 2017). Streaming: memory does not
  grow with the number of devices. One device can move it arbitrarily far.
- ``norm_clip``: each delta is scaled down to at most a bound in L2 norm before the weighted
  mean, which bounds what one device can do (Sun et al. 2019, "Can You Really Backdoor
  Federated Learning?"). With a fixed ``clip`` it streams; by default the bound is
  ``clip_multiplier`` times the round's median norm, so it keeps the round's deltas.
- ``screened_clip``: ``norm_clip`` after dropping every delta that points away from the
  coordinate-wise median (negative cosine similarity), the reference FLTrust (Cao et al., NDSS
  2021) takes from a server-side dataset taken here from the round itself. Norm clipping alone
  bounds scaled updates but not sign-flipped ones of ordinary size; the screen removes those.
- ``median``: the coordinate-wise median (Yin et al., ICML 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates"). Unweighted; keeps every delta of the round.
- ``trimmed_mean``: per coordinate, drop the ``trim`` fraction of largest and of smallest
  values and average the rest (same paper). Unweighted; keeps every delta of the round.

The last two need memory for all of a round's deltas (participants x model size); at the
scale of a Pi fleet's models that is small, but it is why ``mean`` stays the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.aggregation import Accumulator, WeightedSum
from aggregator.strategies.fednova import Normalised

METHODS = ("mean", "norm_clip", "screened_clip", "median", "trimmed_mean")


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))


class ClippedSum(WeightedSum):
    """Weighted mean of deltas each clipped to L2 norm ``clip``."""

    def __init__(self, spec: Mapping[str, tuple[int, ...]], clip: float) -> None:
        super().__init__(spec)
        if not clip > 0:
            raise ValueError(f"clip norm must be positive, got {clip}")
        self.clip = clip
        self.norms: list[float] = []
        self.clipped = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        norm = l2_norm(delta)
        self.norms.append(norm)
        if norm > self.clip:
            self.clipped += 1
            scale = self.clip / norm
            delta = {k: v * scale for k, v in delta.items()}
        super().add(delta, weight)


class _Buffered(Accumulator):
    """Keeps the round's deltas as one (devices x parameters) matrix per tensor."""

    def __init__(self, spec: Mapping[str, tuple[int, ...]]) -> None:
        self.spec = dict(spec)
        self._rows: dict[str, list[np.ndarray]] = {k: [] for k in spec}
        self.weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if set(delta) != set(self.spec):
            raise ValueError("delta tensors do not match the model")
        for k, shape in self.spec.items():
            if np.shape(delta[k]) != tuple(shape):
                raise ValueError(f"delta {k!r} has shape {np.shape(delta[k])}, not {shape}")
        for k in self.spec:
            self._rows[k].append(np.asarray(delta[k], dtype=np.float32).ravel())
        self.weight += weight
        self.count += 1

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def mean(self) -> dict[str, np.ndarray]:
        """The robust aggregate (named ``mean`` to share WeightedSum's interface)."""
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        return {
            k: self._reduce(np.stack(rows)).reshape(self.spec[k]).astype(np.float32)
            for k, rows in self._rows.items()
        }


class CoordinateMedian(_Buffered):
    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)


class TrimmedMean(_Buffered):
    def __init__(self, spec: Mapping[str, tuple[int, ...]], trim: float) -> None:
        super().__init__(spec)
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {trim}")
        self.trim = trim

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        n = stacked.shape[0]
        cut = int(math.floor(self.trim * n))
        if cut == 0 or n - 2 * cut < 1:
            return stacked.mean(axis=0)
        return np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0)


class RoundClip(_Buffered):
    """Weighted mean of deltas clipped to ``multiplier`` x the round's median norm; with
    ``screen``, deltas opposed to the coordinate-wise median are dropped first."""

    def __init__(self, spec: Mapping[str, tuple[int, ...]], multiplier: float, screen: bool):
        super().__init__(spec)
        if not multiplier > 0:
            raise ValueError(f"clip multiplier must be positive, got {multiplier}")
        self.multiplier = multiplier
        self.screen = screen
        self._weights: list[float] = []
        self.dropped = 0
        self.clipped = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        super().add(delta, weight)
        self._weights.append(float(weight))

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        X = np.concatenate([np.stack(self._rows[k]) for k in self.spec], axis=1)
        w = np.asarray(self._weights)
        if self.screen:
            ref = np.median(X, axis=0)
            cos = X @ ref / (np.linalg.norm(X, axis=1) * np.linalg.norm(ref) + 1e-12)
            keep = cos > 0
            if keep.any():  # all opposed can only mean a broken round: fall back to all
                self.dropped = int((~keep).sum())
                X, w = X[keep], w[keep]
        norms = np.linalg.norm(X, axis=1)
        bound = self.multiplier * float(np.median(norms))
        scale = np.minimum(1.0, bound / np.maximum(norms, 1e-12))
        self.clipped = int((scale < 1.0).sum())
        agg = (w * scale) @ X / w.sum()
        out, i = {}, 0
        for k, shape in self.spec.items():
            n = int(np.prod(shape))
            out[k] = agg[i : i + n].reshape(shape).astype(np.float32)
            i += n
        return out


def make_accumulator(
    method: str,
    spec: Mapping[str, tuple[int, ...]],
    *,
    trim: float = 0.2,
    clip: float = 0.0,
    clip_multiplier: float = 2.0,
):
    """The accumulator for one round under aggregation rule ``method``; ``clip`` > 0 fixes the
    norm bound of ``norm_clip`` (then it streams)."""
    if method == "mean":
        return WeightedSum(spec)
    if method == "norm_clip":
        if clip > 0:
            return ClippedSum(spec, clip)
        return RoundClip(spec, clip_multiplier, screen=False)
    if method == "screened_clip":
        return RoundClip(spec, clip_multiplier, screen=True)
    if method == "median":
        return CoordinateMedian(spec)
    if method == "trimmed_mean":
        return TrimmedMean(spec, trim)
    raise ValueError(f"unknown aggregation {method!r}; use one of {', '.join(METHODS)}")


def accumulator_for(strategy: Any, spec: Mapping[str, tuple[int, ...]]) -> Accumulator:
    """The accumulator that a ``[strategy]`` table (edgefl.config.StrategyConfig) asks for:
    its aggregation rule, within FedNova's normalisation if ``fednova`` is on."""
    rule = make_accumulator(
        strategy.aggregation,
        spec,
        trim=strategy.trim_fraction,
        clip=strategy.clip_norm,
        clip_multiplier=strategy.clip_multiplier,
    )
    return Normalised(rule) if strategy.fednova else rule
