"""What the device agent does with a task's training, and the personal model it can build.

With ``[personal] method = "none"`` a task trains the global model on all the device's data, as
plain FedAvg does. With any other method:

- a share of the device's data (``holdout``) is kept out of all training to evaluate on: a
  draw seeded by the device's id, or its newest samples of each class (``holdout_split``), the
  same on every run and after restarts; a device with at least two samples keeps at least one
  on each side;
- the global model of the task is evaluated on it first (``global_acc``), the method trains
  (device/personal/, on the training split only), and the device's personal model on the
  task's global model is evaluated after (``personal_acc``); the update carries both and the
  held-out count (``holdout_samples``): figures only, never data;
- the method's state is saved (device/personal/state.py) after every task's training, whether
  or not its update then reaches the aggregator in time: the personal model learnt from the
  device's own data either way.

The state is loaded when the agent starts, so the device has its personal model before its
next task. It is dropped, with the reason logged, when a task asks for another method (or for
none), and when the model's shape is not the one it was saved for (state.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device.personal import Personaliser, Settings, make_personaliser, seed_for, task_sgd
from device.personal.state import FILE_NAME, load, save
from edgefl.config import ConfigError, PersonalConfig
from edgefl.data import Dataset
from edgefl.models import personal_keys

if TYPE_CHECKING:
    from torch import nn

    from edgefl.messages import Task
    from edgefl.training import TrainResult

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """A task's training, as the agent encodes it."""

    weights: dict[str, np.ndarray]  # the update is their difference from the task's model ...
    result: TrainResult
    spec: dict[str, tuple[int, ...]]  # ... over these tensors
    samples: int  # the samples it trained on: the update's weight
    metrics: dict[str, float] = field(default_factory=dict)


def holdout_split(
    data: Dataset, share: float, device_id: str, how: str = "random", gap: int = 0
) -> tuple[Dataset, Dataset]:
    """(training, held-out) parts of ``data``, ``share`` of it held out; with two samples or
    more, each part has at least one.

    ``how`` is ``random`` (a draw seeded by the device's id) or ``latest``: the last ``share``
    of each class in the data's order, with the ``gap`` samples of that class just before them
    in neither part (so that overlapping windows of one recording do not sit on both sides)."""
    n = len(data)
    if n < 2:
        out, keep = np.arange(0), np.arange(n)
    elif how == "random":
        held = min(max(round(share * n), 1), n - 1)
        order = np.random.default_rng(seed_for(device_id, "holdout")).permutation(n)
        out, keep = np.sort(order[:held]), np.sort(order[held:])
    elif how == "latest":
        out_parts, keep_parts = [], []
        for c in np.unique(data.y):
            idx = np.flatnonzero(data.y == c)  # in the file's order
            held = min(round(share * len(idx)), len(idx) - 1)
            room = len(idx) - held - 1  # training keeps one sample of the class at least
            cut = len(idx) - held - (min(gap, room) if held else 0)
            out_parts.append(idx[len(idx) - held :])
            keep_parts.append(idx[:cut])
        out, keep = np.sort(np.concatenate(out_parts)), np.sort(np.concatenate(keep_parts))
        if not len(out):  # every class too small to spare one: the newest sample
            out, keep = np.array([n - 1]), np.arange(n - 1)
    else:
        raise ValueError(f"unknown holdout split {how!r}")
    return Dataset(data.X[keep], data.y[keep]), Dataset(data.X[out], data.y[out])


class TaskTrainer:
    """A task's training on one device, with or without personalisation; the agent's only
    door to device/personal/."""

    def __init__(
        self,
        device_id: str,
        model_name: str,
        model: nn.Module,
        spec: Mapping[str, tuple[int, ...]],
        data: Dataset,
        state_dir: str | Path,
    ) -> None:
        self.device_id = device_id
        self.model_name = model_name
        self.model = model
        self.spec = {k: tuple(s) for k, s in spec.items()}
        self.data = data
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._splits: dict[tuple[float, str, int], tuple[Dataset, Dataset]] = {}
        self.personaliser: Personaliser | None = self._restore()

    # -- the state's life ------------------------------------------------------------------------

    def _restore(self) -> Personaliser | None:
        state = load(self.path, self.spec)
        if state is None:
            if self.path.exists():
                self.path.unlink(missing_ok=True)  # load() said why
            return None
        try:
            settings = Settings.from_dict(state.settings)
            if settings.method != state.method:
                raise ValueError(f"settings for {settings.method}, state of {state.method}")
            return self._build(settings, state)
        except (ConfigError, ValueError, KeyError, TypeError) as e:
            log.warning("personal state %s dropped: its settings are not valid (%s)", self.path, e)
            self.path.unlink(missing_ok=True)
            return None

    def _build(self, settings: Settings, state=None) -> Personaliser:
        train, _ = self.split(settings.personal)
        return make_personaliser(
            settings, self.model, self.model_name, self.spec, train, self.device_id, state
        )

    def _for(self, settings: Settings) -> Personaliser | None:
        """The personaliser for a task's settings: the one held if it runs that method (with
        the task's settings from now on), else a new one, the old state dropped."""
        held = self.personaliser
        if held is not None and held.method == settings.method:
            held.settings = settings
            held.data = self.split(settings.personal)[0]
            return held
        if held is not None:
            log.info(
                "%s: personal state of method %s dropped: the task asks for %s",
                self.device_id,
                held.method,
                settings.method,
            )
            self.path.unlink(missing_ok=True)
        fresh = self._build(settings) if settings.method != "none" else None
        with self._lock:
            self.personaliser = fresh
        return fresh

    def split(self, personal: PersonalConfig) -> tuple[Dataset, Dataset]:
        """(training, held-out) parts of the device's data as ``personal`` draws them."""
        key = (personal.holdout, personal.holdout_split, personal.holdout_gap)
        if key not in self._splits:
            self._splits[key] = holdout_split(
                self.data,
                personal.holdout,
                self.device_id,
                personal.holdout_split,
                personal.holdout_gap,
            )
        return self._splits[key]

    # -- a task --------------------------------------------------------------------------------

    def refusal(self, task: Task) -> str | None:
        """Why this device cannot do the task's personalisation (its model has too few layers
        for the personal ones the task keeps here), or None."""
        layers = PersonalConfig(**task.personal).device_layers
        try:
            personal_keys(self.spec, layers)
        except ValueError as e:
            return f"personal: {e}"
        return None

    def train(self, task: Task, base_weights: Mapping[str, np.ndarray]) -> Trained:
        """The task's training on the worker thread (it uses the agent's model)."""
        settings = Settings.from_task(task)
        personaliser = self._for(settings)
        if personaliser is None:
            return self._plain(task, base_weights)
        started, cpu_started = time.perf_counter(), time.thread_time()
        train, held = self.split(settings.personal)
        global_acc = self._accuracy(base_weights, held)
        weights, result = personaliser.train(task, base_weights, train)
        personal_acc = self._accuracy(personaliser.personalise(base_weights), held)
        try:
            save(self.path, personaliser.state())
        except OSError as e:
            log.warning("%s: personal state not saved: %s", self.device_id, e)
        # the whole of it, evaluation included, is what the task cost this device
        result.seconds = time.perf_counter() - started
        result.cpu_seconds = time.thread_time() - cpu_started
        metrics = {}
        if len(held):
            metrics = {
                "personal_acc": personal_acc,
                "global_acc": global_acc,
                "holdout_samples": float(len(held)),
            }
        return Trained(weights, result, personaliser.update_spec, len(train), metrics)

    def _plain(self, task: Task, base_weights: Mapping[str, np.ndarray]) -> Trained:
        """FedAvg's local training on all the device's data."""
        from edgefl.models import get_weights, set_weights

        set_weights(self.model, base_weights)
        result = task_sgd(self.model, self.data, task, self.device_id)
        return Trained(get_weights(self.model), result, dict(self.spec), len(self.data))

    def _accuracy(self, weights: Mapping[str, np.ndarray], data: Dataset) -> float:
        if not len(data):
            return 0.0
        from edgefl.models import set_weights
        from edgefl.training import evaluate

        set_weights(self.model, weights)
        return evaluate(self.model, data)[1]

    # -- serving ---------------------------------------------------------------------------------

    def personal_model(
        self, global_weights: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray] | None:
        """The device's personal model on ``global_weights`` (any global model of this model's
        shape, an older one after a rollback included); None while it has no method (none,
        or no task has named one yet and no state was saved). Safe on any thread."""
        with self._lock:
            personaliser = self.personaliser
        return None if personaliser is None else personaliser.personalise(global_weights)
