"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017.

The new model is the sample-weighted mean of the devices' models, i.e. the current model plus the
weighted mean delta. ``server_lr`` other than 1 scales that step (Reddi et al. 2021 call this
FedAvg with a server learning rate).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.strategies.base import Strategy, Weights


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def step(
        self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]
    ) -> Weights:
        return {
            k: (w + self.server_lr * mean_delta[k]).astype(np.float32)
            if k in mean_delta
            else np.array(w, dtype=np.float32)
            for k, w in weights.items()
        }
