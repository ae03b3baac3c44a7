from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

Weights = dict[str, np.ndarray]


class Strategy(ABC):
    name: str

    @abstractmethod
    def step(
        self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]
    ) -> Weights:
        """The next global weights from the current ones and the round's weighted mean delta.

        ``mean_delta`` may cover some of the tensors only (the layers FedPer and FedRep keep
        on the devices are never aggregated): the others stay as they are, and an optimiser
        keeps state for the covered ones alone."""

    def state(self) -> dict[str, Weights]:
        return {}

    def load_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        return None
