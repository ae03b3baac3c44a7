"""Server strategies: what the aggregator does with a round's averaged delta.

Each strategy is one module named for the paper it implements. The interface is small:
``step(weights, mean_delta) -> new weights``, plus ``state()``/``load_state()`` so a checkpoint
keeps the server optimiser's memory (momentum, Adam moments) across a restart.
Deltas are ``local - base``, so a positive step follows the devices.
"""

from __future__ import annotations

from aggregator.strategies.base import Strategy
from aggregator.strategies.fedadam import FedAdam
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedavgm import FedAvgM
from edgefl.config import StrategyConfig

__all__ = ["Strategy", "FedAvg", "FedAvgM", "FedAdam", "make_strategy"]


def make_strategy(cfg: StrategyConfig) -> Strategy:
    if cfg.name == "fedavg":
        return FedAvg(server_lr=cfg.server_lr)
    if cfg.name == "fedavgm":
        return FedAvgM(server_lr=cfg.server_lr, momentum=cfg.momentum)
    if cfg.name == "fedadam":
        return FedAdam(server_lr=cfg.server_lr, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)
    raise ValueError(f"unknown strategy {cfg.name!r}; use fedavg, fedavgm or fedadam")
