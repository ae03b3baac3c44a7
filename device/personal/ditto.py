"""Ditto: Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization" (ICML 2021).

Each device keeps a personal model v, trained on its own data with a proximal term that pulls
it towards the global model w:

    min_v  F_k(v) + lambda/2 ||v - w||^2

A task trains the global model as FedAvg does (that is what is sent), and v for ``epochs``
epochs of SGD on the regularised objective towards the task's global model (Algorithm 1 of the
paper, whose global update is plain FedAvg's). lambda (``ditto_lambda``) moves between local
training alone (0) and the global model (large). v starts as the first global model.

The personal model on a global model: v itself when v was last pulled towards that very model
(told by its digest); on any other one (a newer version before the next task, a rollback to an
older one) v after ``epochs`` more regularised epochs towards it, computed afresh and not kept,
so the answer depends on the state and the given model alone. Keeping v as it is would serve a
model pulled towards a global model the fleet no longer serves; training towards the given one
is what the next task would do.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device.personal import Personaliser, Weights, combined, digest
from edgefl.data import Dataset
from edgefl.messages import Task
from edgefl.models import get_weights
from edgefl.training import TrainResult

SLOT = "personal"
ANCHOR = "anchor"


class Ditto(Personaliser):
    method = "ditto"

    def _pulled(
        self,
        v: Mapping[str, np.ndarray],
        global_weights: Mapping[str, np.ndarray],
        data: Dataset,
    ) -> tuple[Weights, TrainResult]:
        """v after the personal epochs on its regularised objective towards the global model."""
        model = self._fresh(v)
        result = self._personal_sgd(
            model,
            data,
            self.settings.personal.epochs,
            prox_mu=self.settings.personal.ditto_lambda,
            anchor=global_weights,
        )
        return get_weights(model), result

    def train(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data_train: Dataset
    ) -> tuple[Weights, TrainResult]:
        weights, result = self._federated(task, base_weights, data_train)
        slots, _, _ = self._read()
        v, personal = self._pulled(slots.get(SLOT, base_weights), base_weights, data_train)
        self._commit(slots={SLOT: v}, notes={ANCHOR: digest(base_weights, self.spec)})
        return weights, combined(result, personal)

    def personalise(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        self._check(global_weights)
        slots, _, notes = self._read()
        if SLOT in slots and notes.get(ANCHOR) == digest(global_weights, self.spec):
            return {k: v.copy() for k, v in slots[SLOT].items()}
        return self._pulled(slots.get(SLOT, global_weights), global_weights, self.data)[0]
