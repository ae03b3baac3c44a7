"""Local training alone: a model trained on the device's own data only, never on the global
model. It is the baseline a federation must beat for its devices to gain from it (at strong
label skew a device's own small model is hard to beat on its own test data; what federation
adds shows most on devices with little data).

The device still trains the task's global model and sends its update as FedAvg does, so that
the federation runs and the same fleet measures both; the personal model takes no part in it.
It starts from the model's initialisation with a seed of the device's own (never from a
global model, which may already hold the fleet's training) and trains ``epochs`` epochs per
task. The personal model is that local model whatever the global model is.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device.personal import Personaliser, Weights, combined
from edgefl.data import Dataset
from edgefl.messages import Task
from edgefl.models import build_model, get_weights
from edgefl.training import TrainResult

SLOT = "local"


class LocalOnly(Personaliser):
    method = "local"

    def _local(self) -> Weights:
        slots, _, _ = self._read()
        if SLOT in slots:
            return slots[SLOT]
        return get_weights(build_model(self.model_name, seed=self.seed))

    def train(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data_train: Dataset
    ) -> tuple[Weights, TrainResult]:
        weights, result = self._federated(task, base_weights, data_train)
        model = self._fresh(self._local())
        local = self._personal_sgd(model, data_train, self.settings.personal.epochs)
        self._commit(slots={SLOT: get_weights(model)})
        return weights, combined(result, local)

    def personalise(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        self._check(global_weights)
        return {k: v.copy() for k, v in self._local().items()}
