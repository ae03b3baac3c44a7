"""FedAdam: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).

The round's mean delta is treated as a pseudo-gradient step direction:

    m <- beta1 * m + (1 - beta1) * delta
    v <- beta2 * v + (1 - beta2) * delta^2
    w <- w + server_lr * m / (sqrt(v) + tau)

As in the paper there is no bias correction; ``tau`` sets how adaptive the step is.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.strategies.base import Strategy, Weights


class FedAdam(Strategy):
    name = "fedadam"

    def __init__(
        self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and tau > 0):
            raise ValueError("FedAdam needs 0 <= beta1, beta2 < 1 and tau > 0")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: Weights = {}
        self.v: Weights = {}

    def step(
        self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]
    ) -> Weights:
        out: Weights = {}
        for k, w in weights.items():
            if k not in mean_delta:  # kept on the devices: never aggregated
                out[k] = np.array(w, dtype=np.float32)
                continue
            d = mean_delta[k].astype(np.float32)
            m = self.m.get(k, np.zeros_like(d))
            v = self.v.get(k, np.zeros_like(d))
            m = self.beta1 * m + (1 - self.beta1) * d
            v = self.beta2 * v + (1 - self.beta2) * d * d
            self.m[k], self.v[k] = m, v
            out[k] = (w + self.server_lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)
        return out

    def state(self) -> dict[str, Weights]:
        return {"m": self.m, "v": self.v}

    def load_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.m = {k: np.asarray(a, dtype=np.float32) for k, a in state.get("m", {}).items()}
        self.v = {k: np.asarray(a, dtype=np.float32) for k, a in state.get("v", {}).items()}
