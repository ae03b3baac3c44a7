"""FedNova: Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020.

When devices run different numbers of local steps, plain FedAvg weights each device's delta by
its samples only, so the devices that did more steps pull the global model towards their own
local optimum: the model converges to the optimum of an objective that silently reweights the
devices. FedNova normalises each delta by its number of local SGD steps tau_i (for plain SGD
without momentum, the normalising factor a_i of the paper is tau_i) and scales the mean back by
the effective number of steps tau_eff = sum_i p_i tau_i:

    delta = tau_eff * sum_i p_i delta_i / tau_i,    p_i = n_i / sum_j n_j

With equal steps everywhere this is exactly FedAvg. It decides how one round's deltas combine,
so it works under any server optimiser (fedavg, fedavgm, fedadam), which then takes ``delta``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.aggregation import Accumulator, Contribution, WeightedSum


class Normalised(Accumulator):
    """FedNova around any accumulator of one round (the weighted mean, or a robust rule from
    aggregator/robust.py): deltas go in divided by their steps, and ``mean()`` scales the
    accumulator's aggregate back by tau_eff."""

    def __init__(self, inner: Accumulator) -> None:
        self.inner = inner
        self.weight = 0.0
        self.weighted_steps = 0.0  # sum_i n_i tau_i

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, delta: Mapping[str, np.ndarray], weight: float, steps: float = 1.0) -> None:
        if not steps >= 1:
            raise ValueError(f"local steps must be at least 1, got {steps}")
        self.inner.add({k: np.asarray(v) / steps for k, v in delta.items()}, weight)
        self.weight += weight
        self.weighted_steps += weight * steps

    def fold(self, c: Contribution) -> None:
        self.add(c.delta, c.weight, c.steps)

    def figures(self) -> dict[str, float]:
        return {"effective_steps": self.effective_steps}

    @property
    def effective_steps(self) -> float:
        """tau_eff: the sample-weighted mean number of local steps."""
        return self.weighted_steps / self.weight if self.weight else 0.0

    def mean(self) -> dict[str, np.ndarray]:
        tau = self.effective_steps
        return {k: (v * tau).astype(np.float32) for k, v in self.inner.mean().items()}


class NormalisedSum(Normalised):
    """FedNova over the streaming weighted sum: one running sum the size of the model."""

    def __init__(self, spec: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__(WeightedSum(spec))
