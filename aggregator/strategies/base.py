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
        """The next global weights from the current ones and the round's weighted mean delta."""

    def state(self) -> dict[str, Weights]:
        return {}

    def load_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        return None
