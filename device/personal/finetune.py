"""Fine-tuning the global model on the device's own data: the personal model is the global
model after ``epochs`` more epochs of local SGD.

The oldest and simplest personalisation, and the one every other method must beat: as a
federated baseline, Wang et al., "Federated Evaluation of On-device Personalization" (2019);
Yu, Bagdasaryan and Shmatikov, "Salvaging Federated Learning by Local Adaptation" (2020).

A task trains the global model as plain FedAvg does. Nothing is kept between tasks but the
settings: the personal model is rebuilt from whichever global model it is given, in the same
order of samples every time (deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device.personal import Personaliser, Weights
from edgefl.data import Dataset
from edgefl.messages import Task
from edgefl.models import get_weights
from edgefl.training import TrainResult


class FineTune(Personaliser):
    method = "finetune"

    def train(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data_train: Dataset
    ) -> tuple[Weights, TrainResult]:
        return self._federated(task, base_weights, data_train)

    def personalise(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        self._check(global_weights)
        model = self._fresh(global_weights)
        self._personal_sgd(model, self.data, self.settings.personal.epochs)
        return get_weights(model)
