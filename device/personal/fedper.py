"""Personal layers: the last ``personal_layers`` layers of the model stay on the device, the rest
(the body) is shared and aggregated.

- FedPer: Arivazhagan, Aggarwal, Singh and Choudhary, "Federated Learning with Personalization
  Layers" (2019). A task trains the whole model (the global body with the device's own head)
  as FedAvg's local SGD would; the body goes back, the head stays.
- FedRep: Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared Representations for
  Personalized Federated Learning" (ICML 2021). A task first trains the head alone for
  ``epochs`` epochs on the global body, frozen; then the body alone for the task's epochs, the
  head frozen. The head fits the shared representation it will be used with.

The personal layers never leave the device: an update carries the body alone (``update_spec``,
edgefl.models.shared_spec), so they cost no uplink, and the aggregator never aggregates them
(the global model keeps them as initialised). Before its first task a device has no head of its
own and uses the global model's.

The personal model on a global model is that model's body with the device's head; it needs no
training, so it is rebuilt at once on any global model (a rollback included).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device.personal import Personaliser, Weights, combined, task_sgd
from edgefl.data import Dataset
from edgefl.messages import Task
from edgefl.models import get_weights, personal_keys, set_weights, shared_spec
from edgefl.training import TrainResult

SLOT = "head"


class FedPer(Personaliser):
    method = "fedper"

    @property
    def head_keys(self) -> tuple[str, ...]:
        return personal_keys(self.spec, self.settings.personal.personal_layers)

    @property
    def update_spec(self) -> dict[str, tuple[int, ...]]:
        return shared_spec(self.spec, self.settings.personal.personal_layers)

    def _with_head(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        """The global model's body with this device's head (the global one's if it has none,
        or if the one it kept is for other layers: personal_layers changed)."""
        slots, _, _ = self._read()
        head = slots.get(SLOT, {})
        keys = self.head_keys
        if set(head) != set(keys):
            head = {}
        return {k: np.array(head.get(k, v), dtype=np.float32) for k, v in global_weights.items()}

    def train(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data_train: Dataset
    ) -> tuple[Weights, TrainResult]:
        weights, result = self._federated(task, self._with_head(base_weights), data_train)
        return self._keep_head(weights, base_weights), result

    def _keep_head(self, trained: Weights, base_weights: Mapping[str, np.ndarray]) -> Weights:
        """Store the trained head; the weights returned hold the trained body and the global
        head (not sent either way)."""
        keys = self.head_keys
        self._commit(slots={SLOT: {k: trained[k].copy() for k in keys}})
        return {k: (np.array(base_weights[k]) if k in keys else v) for k, v in trained.items()}

    def personalise(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        self._check(global_weights)
        return self._with_head(global_weights)


class FedRep(FedPer):
    method = "fedrep"

    def train(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data_train: Dataset
    ) -> tuple[Weights, TrainResult]:
        keys = set(self.head_keys)
        set_weights(self.model, self._with_head(base_weights))
        # the head on the global body, frozen
        head = self._personal_sgd(
            self.model, data_train, self.settings.personal.epochs, train_only=keys
        )
        # then the body for the task's work, the head frozen
        body = task_sgd(
            self.model, data_train, task, self.device_id, train_only=set(self.spec) - keys
        )
        return self._keep_head(get_weights(self.model), base_weights), combined(body, head)
