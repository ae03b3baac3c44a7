"""Staleness: how much an update built on an old model counts in asynchronous mode.

An update's staleness ``s`` is the number of model versions published between the version it
was trained from and the version it is applied to. The weightings of FedAsync (Xie, Koyejo and
Gupta, "Asynchronous Federated Optimization", 2019), which FedBuff (Nguyen et al., "Federated
Learning with Buffered Asynchronous Aggregation", AISTATS 2022) applies to its buffer:

- ``constant``: 1, whatever the staleness;
- ``polynomial``: ``(1 + s) ** -a`` (``rounds.staleness_exponent``, a = 0.5 by default);
- ``hinge``: 1 up to ``b`` versions (``rounds.hinge_grace``), then ``1 / (a (s - b) + 1)``
  (``rounds.hinge_slope``).

:class:`StalenessWeighted` applies the weight to the delta, not to the update's sample weight,
around any accumulator of aggregator/aggregation.py (the weighted mean, a robust rule of
aggregator/robust.py, FedNova's normalisation): FedBuff's step is ``(1/K) sum_k w(s_k) delta_k``,
so a buffer of uniformly stale updates makes a smaller step, where a sample weight would be
normalised away by the mean.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from aggregator.aggregation import Accumulator, Contribution
from edgefl.config import STALENESS_WEIGHTINGS, ConfigError, RoundsConfig


@dataclass(frozen=True)
class Weighting:
    """One staleness weighting with its parameters; call it with a staleness."""

    kind: str = "polynomial"
    exponent: float = 0.5
    hinge_slope: float = 10.0
    hinge_grace: int = 4

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_WEIGHTINGS:
            raise ConfigError(
                f"staleness weighting {self.kind!r} is not one of {', '.join(STALENESS_WEIGHTINGS)}"
            )

    @classmethod
    def from_config(cls, rc: RoundsConfig) -> Weighting:
        return cls(rc.staleness, rc.staleness_exponent, rc.hinge_slope, rc.hinge_grace)

    def __call__(self, staleness: int) -> float:
        s = max(0, int(staleness))
        if self.kind == "polynomial":
            return float((1.0 + s) ** -self.exponent)
        if self.kind == "hinge":
            if s <= self.hinge_grace:
                return 1.0
            return 1.0 / (self.hinge_slope * (s - self.hinge_grace) + 1.0)
        return 1.0


class StalenessWeighted(Accumulator):
    """Folds each contribution into ``inner`` with its delta scaled by the weight of its
    staleness against ``applies_to``, the model version the buffer will be applied to."""

    def __init__(self, inner: Accumulator, weighting: Weighting, applies_to: int) -> None:
        self.inner = inner
        self.weighting = weighting
        self.applies_to = applies_to
        self.staleness: Counter[int] = Counter()  # staleness -> updates

    @property
    def count(self) -> int:
        return self.inner.count

    def fold(self, c: Contribution) -> None:
        s = max(0, self.applies_to - c.base_version)
        w = self.weighting(s)
        delta = c.delta if w == 1.0 else {k: np.asarray(v) * w for k, v in c.delta.items()}
        self.inner.fold(Contribution(c.device_id, delta, c.weight, c.steps, c.base_version))
        self.staleness[s] += 1

    def add(self, delta, weight: float) -> None:
        self.inner.add(delta, weight)

    def mean(self) -> dict[str, np.ndarray]:
        return self.inner.mean()

    def aggregate(self) -> dict[str, np.ndarray] | None:
        return self.inner.aggregate()

    def figures(self) -> dict[str, float]:
        n = sum(self.staleness.values())
        out = dict(self.inner.figures())
        if n:
            out["staleness_mean"] = sum(s * k for s, k in self.staleness.items()) / n
            out["staleness_max"] = float(max(self.staleness))
        return out
