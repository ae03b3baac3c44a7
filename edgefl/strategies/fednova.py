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

from edgefl.aggregation import WeightedSum


class NormalisedSum(WeightedSum):
    """A streaming weighted sum of step-normalised deltas; ``mean()`` is FedNova's delta.

    Like :class:`WeightedSum` it holds one running sum the size of the model, and two partial
    sums merge exactly.
    """

    def __init__(self, spec: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__(spec)
        self.weighted_steps = 0.0  # sum_i n_i tau_i

    def add(self, delta: Mapping[str, np.ndarray], weight: float, steps: float = 1.0) -> None:
        if not steps >= 1:
            raise ValueError(f"local steps must be at least 1, got {steps}")
        super().add({k: np.asarray(v) / steps for k, v in delta.items()}, weight)
        self.weighted_steps += weight * steps

    def merge(self, other: WeightedSum) -> None:
        super().merge(other)
        self.weighted_steps += getattr(other, "weighted_steps", float(other.weight))

    @property
    def effective_steps(self) -> float:
        """tau_eff: the sample-weighted mean number of local steps."""
        return self.weighted_steps / self.weight if self.weight else 0.0

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no updates to average")
        scale = self.effective_steps / self.weight
        return {k: (v * scale).astype(np.float32) for k, v in self._sum.items()}

    def state(self) -> dict[str, object]:
        return {**super().state(), "weighted_steps": self.weighted_steps}

    def load_state(self, state: Mapping[str, object]) -> None:
        super().load_state(state)
        self.weighted_steps = float(state.get("weighted_steps", self.weight))  # type: ignore[arg-type]
