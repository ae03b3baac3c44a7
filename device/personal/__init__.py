"""Personalised models on the device: besides training the global model, every device keeps a
model fitted to its own data ([personal] method; docs/personalisation.md).

In a real fleet each device's data differ (its sensor, its user, its place), and one global
model serves none of them best. A personalisation method decides two things, and only these:

- what the device does with a task (:meth:`Personaliser.train`): the training whose result it
  sends (for FedPer and FedRep only the shared layers of it), and how its personal state moves;
- what its personal model is on a given global model (:meth:`Personaliser.personalise`): what
  the device evaluates and serves, also after a rollback to an older global model. It must be
  deterministic given the state and the global model, and never change the state.

One module per method, each naming its paper: local.py (local training alone, the baseline),
finetune.py, fedper.py (FedPer and FedRep), ditto.py, apfl.py (model mixing), perfedavg.py
(meta-learning). state.py keeps a method's state on the disk; trainer.py is what the agent
calls (the held-out split, evaluation, the state's life). The modules of the methods import
torch; this one and trainer.py do not, so that a serve-only device can import the agent.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from device.personal.state import PersonalState
from edgefl.config import PersonalConfig
from edgefl.data import Dataset

if TYPE_CHECKING:
    from torch import nn

    from edgefl.messages import Task
    from edgefl.training import TrainResult

Weights = dict[str, np.ndarray]
Spec = Mapping[str, tuple[int, ...]]

# method -> "module:class", imported when first used (they import torch)
METHODS: dict[str, str] = {
    "local": "device.personal.local:LocalOnly",
    "finetune": "device.personal.finetune:FineTune",
    "fedper": "device.personal.fedper:FedPer",
    "fedrep": "device.personal.fedper:FedRep",
    "ditto": "device.personal.ditto:Ditto",
    "apfl": "device.personal.apfl:APFL",
    "perfedavg": "device.personal.perfedavg:PerFedAvg",
}


@dataclass(frozen=True)
class Settings:
    """What a personaliser trains with: the task's [personal] table, and the learning rate and
    batch size of its personal training (kept, so that the personal model can be built again
    without a task: after a restart, or on a rollback)."""

    personal: PersonalConfig
    lr: float  # personal.lr, or the task's when that is 0
    batch_size: int

    @classmethod
    def from_task(cls, task: Task) -> Settings:
        personal = PersonalConfig(**task.personal)
        return cls(personal, personal.lr or task.lr, task.batch_size)

    @property
    def method(self) -> str:
        return self.personal.method

    def to_dict(self) -> dict[str, Any]:
        return {"personal": asdict(self.personal), "lr": self.lr, "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Settings:
        return cls(PersonalConfig(**obj["personal"]), float(obj["lr"]), int(obj["batch_size"]))


def digest(weights: Mapping[str, np.ndarray], spec: Spec) -> str:
    """A fingerprint of a model's weights (which global model a state was built against)."""
    h = hashlib.sha256()
    for k in spec:
        h.update(np.ascontiguousarray(weights[k], dtype="<f4").tobytes())
    return h.hexdigest()[:32]


def seed_for(device_id: str, what: str) -> int:
    """A seed for one device's piece of work: the same on every run and after restarts."""
    return int.from_bytes(hashlib.sha256(f"{device_id}/{what}".encode()).digest()[:4], "big")


def task_sgd(
    model: nn.Module, data: Dataset, task: Task, device_id: str, **extra: Any
) -> TrainResult:
    """The local SGD a task asks for (its epochs, step cap, batch, rate and proximal term) on
    ``model`` as it stands, seeded by device and task; ``extra`` goes to ``train_local`` (which
    parameters train, say). Imports torch."""
    from edgefl.training import train_local

    return train_local(
        model,
        data,
        epochs=task.epochs,
        batch_size=task.batch_size,
        lr=task.lr,
        seed=seed_for(device_id, str(task.round)),
        max_steps=task.max_steps,
        prox_mu=task.prox_mu,
        **extra,
    )


class Personaliser:
    """A personalisation method on one device. Subclasses implement :meth:`train` and
    :meth:`personalise`, and keep what must survive between tasks in slots and scalars
    (:meth:`_commit`), which :meth:`state` hands to state.py.

    ``model`` is the device's training model, used by :meth:`train` alone (the training worker,
    one task at a time); :meth:`personalise` may run on another thread at the same time, so it
    builds models of its own and reads the state through :meth:`_read`, which gives one
    consistent generation of it."""

    method: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        spec: Spec,
        settings: Settings,
        data: Dataset,
        device_id: str,
        state: PersonalState | None = None,
    ) -> None:
        self.model = model
        self.model_name = model_name
        self.spec = {k: tuple(s) for k, s in spec.items()}
        self.settings = settings
        self.data = data  # the training split: what personalise() fits to
        self.device_id = device_id
        self.seed = seed_for(device_id, f"personal/{self.method}")
        self._lock = threading.Lock()
        self._slots: dict[str, Weights] = dict(state.slots) if state else {}
        self._scalars: dict[str, float] = dict(state.scalars) if state else {}
        self._notes: dict[str, str] = dict(state.notes) if state else {}

    # -- what a method implements ------------------------------------------------------------------

    def train(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data_train: Dataset
    ) -> tuple[Weights, TrainResult]:
        """The method's part of ``task`` on ``data_train``: the weights the update is computed
        from (their ``update_spec`` part is sent) and what the training cost; the personal
        state moves as the method says."""
        raise NotImplementedError

    def personalise(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        """The device's personal model on ``global_weights`` (every tensor of the spec)."""
        raise NotImplementedError

    @property
    def update_spec(self) -> dict[str, tuple[int, ...]]:
        """The tensors an update carries: all of them unless the method keeps some here."""
        return dict(self.spec)

    # -- shared machinery ------------------------------------------------------------------------

    def state(self, settings: Settings | None = None) -> PersonalState:
        slots, scalars, notes = self._read()
        return PersonalState(
            self.method,
            dict(self.spec),
            (settings or self.settings).to_dict(),
            slots,
            scalars,
            notes,
        )

    def _read(self) -> tuple[dict[str, Weights], dict[str, float], dict[str, str]]:
        with self._lock:
            return dict(self._slots), dict(self._scalars), dict(self._notes)

    def _commit(
        self,
        slots: Mapping[str, Weights] | None = None,
        scalars: Mapping[str, float] | None = None,
        notes: Mapping[str, str] | None = None,
    ) -> None:
        """Replace (never mutate) state entries, all at once."""
        with self._lock:
            self._slots = {**self._slots, **(slots or {})}
            self._scalars = {**self._scalars, **(scalars or {})}
            self._notes = {**self._notes, **(notes or {})}

    def _check(self, weights: Mapping[str, np.ndarray]) -> None:
        """A global model of this model's shape, or ValueError."""
        if set(weights) != set(self.spec):
            raise ValueError(f"weights for {sorted(weights)}, the model has {sorted(self.spec)}")
        for k, shape in self.spec.items():
            if tuple(np.shape(weights[k])) != shape:
                raise ValueError(f"{k}: shape {np.shape(weights[k])}, the model has {shape}")

    def _fresh(self, weights: Mapping[str, np.ndarray]) -> nn.Module:
        """A model of its own holding ``weights`` (personalise() never touches self.model)."""
        from edgefl.models import build_model, set_weights

        model = build_model(self.model_name)
        set_weights(model, weights)
        return model

    def _federated(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data: Dataset
    ) -> tuple[Weights, TrainResult]:
        """The task's own training of the global model (FedAvg's local SGD, as a device
        without personalisation does it) on ``self.model``."""
        from edgefl.models import get_weights, set_weights

        set_weights(self.model, base_weights)
        result = task_sgd(self.model, data, task, self.device_id)
        return get_weights(self.model), result

    def _personal_sgd(
        self, model: nn.Module, data: Dataset, epochs: int, **options: Any
    ) -> TrainResult:
        """The method's personal training: its epochs at the personal learning rate and batch
        size, in an order that depends on the device alone (deterministic)."""
        from edgefl.training import train_local

        return train_local(
            model,
            data,
            epochs=epochs,
            batch_size=self.settings.batch_size,
            lr=self.settings.lr,
            seed=self.seed,
            **options,
        )


def combined(main: TrainResult, *more: TrainResult) -> TrainResult:
    """What a task's training cost in all: the loss, accuracy and steps of ``main`` (the
    training whose result is sent: FedNova counts its steps), the samples and time of all."""
    from edgefl.training import TrainResult

    return TrainResult(
        loss=main.loss,
        accuracy=main.accuracy,
        steps=main.steps,
        samples_seen=main.samples_seen + sum(r.samples_seen for r in more),
        seconds=main.seconds + sum(r.seconds for r in more),
        cpu_seconds=main.cpu_seconds + sum(r.cpu_seconds for r in more),
    )


def make_personaliser(
    settings: Settings,
    model: nn.Module,
    model_name: str,
    spec: Spec,
    data: Dataset,
    device_id: str,
    state: PersonalState | None = None,
) -> Personaliser:
    """The personaliser of ``settings.method`` (not ``none``)."""
    module, _, name = METHODS[settings.method].partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(model, model_name, spec, settings, data, device_id, state)
