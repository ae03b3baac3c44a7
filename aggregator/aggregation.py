"""What a round folds its accepted updates into: the accumulator interface, and the streaming
weighted sum at the heart of a round.

A round hands every accepted update to its accumulator as a :class:`Contribution` and asks it
for the combined delta when it closes. Each aggregation rule is one implementation: the
sample-weighted mean here, the robust rules in aggregator/robust.py, FedNova's normalisation around
any of them in aggregator/strategies/fednova.py. The round knows none of them by name; a new rule
(a staleness-weighted buffer, masked sums) is one more implementation.

The weighted sum folds updates in as they arrive: the aggregator holds one running sum the size
of the model, whatever the number of devices. Two partial sums merge exactly (aggregation is a
sum), which is what lets several ingest workers share a round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Contribution:
    """One accepted update, as an accumulator sees it."""

    device_id: str
    delta: Mapping[str, np.ndarray]
    weight: float  # its number of samples
    steps: float  # local SGD steps it ran, held to what its task allowed
    base_version: int  # the model version it was trained from


class Accumulator:
    """The interface a round folds into. Implementations define ``add(delta, weight)``,
    ``mean()`` (the rule's combined delta) and ``count``; they override :meth:`fold` if they
    need more of the contribution than its delta and weight, and :meth:`figures` to report
    something of their own in the round's metrics."""

    count: int

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        raise NotImplementedError

    def mean(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def fold(self, c: Contribution) -> None:
        self.add(c.delta, c.weight)

    def aggregate(self) -> dict[str, np.ndarray] | None:
        """The round's combined delta, or None if nothing was folded in."""
        return self.mean() if self.count else None

    def figures(self) -> dict[str, float]:
        return {}


class WeightedSum(Accumulator):
    def __init__(self, spec: Mapping[str, tuple[int, ...]]) -> None:
        # float64 so that thousands of small contributions do not lose precision
        self._sum = {k: np.zeros(shape, dtype=np.float64) for k, shape in spec.items()}
        self.weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if set(delta) != set(self._sum):
            raise ValueError("delta tensors do not match the model")
        for k, acc in self._sum.items():
            # numpy would broadcast a (1,)-shaped delta over the whole tensor without a word
            if np.shape(delta[k]) != acc.shape:
                raise ValueError(f"delta {k!r} has shape {np.shape(delta[k])}, not {acc.shape}")
        for k, acc in self._sum.items():
            # in float64: numpy keeps float32 for float32 x Python float, which can overflow
            acc += weight * np.asarray(delta[k], dtype=np.float64)
        self.weight += weight
        self.count += 1

    def merge(self, other: WeightedSum) -> None:
        for k, acc in self._sum.items():
            acc += other._sum[k]
        self.weight += other.weight
        self.count += other.count

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no updates to average")
        return {k: (v / self.weight).astype(np.float32) for k, v in self._sum.items()}

    def state(self) -> dict[str, object]:
        """For checkpoints: the partial sum as it stands."""
        return {"sum": self._sum, "weight": self.weight, "count": self.count}

    def load_state(self, state: Mapping[str, object]) -> None:
        sums = state["sum"]
        assert isinstance(sums, Mapping)
        for k in self._sum:
            # a copy: sharing the array would make two sums add into one buffer
            self._sum[k] = np.array(sums[k], dtype=np.float64).reshape(self._sum[k].shape)
        self.weight = float(state["weight"])  # type: ignore[arg-type]
        self.count = int(state["count"])  # type: ignore[call-overload]
