"""FedAvgM (server momentum): Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", 2019.

    v <- momentum * v + mean_delta
    w <- w + server_lr * v

Momentum on the server smooths the round-to-round swings that label-skewed devices cause.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.strategies.base import Strategy, Weights


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.server_lr = server_lr
        self.momentum = momentum
        self.velocity: Weights = {}

    def step(
        self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]
    ) -> Weights:
        out: Weights = {}
        for k, w in weights.items():
            if k not in mean_delta:  # kept on the devices: never aggregated
                out[k] = np.array(w, dtype=np.float32)
                continue
            v = self.velocity.get(k)
            v = mean_delta[k].astype(np.float32) if v is None else self.momentum * v + mean_delta[k]
            self.velocity[k] = v.astype(np.float32)
            out[k] = (w + self.server_lr * v).astype(np.float32)
        return out

    def state(self) -> dict[str, Weights]:
        return {"velocity": self.velocity}

    def load_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.velocity = {
            k: np.asarray(v, dtype=np.float32) for k, v in state.get("velocity", {}).items()
        }
