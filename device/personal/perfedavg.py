"""Per-FedAvg, meta-learning: Fallah, Mokhtari and Ozdaglar, "Personalized Federated Learning
with Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach" (NeurIPS 2020), in its
first-order form (Per-FedAvg (FO)).

The federation trains a global model that adapts well to each device in a few steps, rather
than one that fits the fleet on average: a device's objective is f(w - alpha grad f(w)), its
loss after one step of size alpha. Each local step of a task takes two independent minibatches
D and D':

    w_tmp <- w - alpha grad f(w; D)           (the inner, adaptation step)
    w     <- w - lr grad f(w_tmp; D')         (the outer step; first order: the Hessian term
                                               of the true meta-gradient is dropped)

The update sent is w - w_global as in FedAvg, with the task's steps, cap and learning rate;
alpha is ``perfedavg_alpha``. The personal model on a global model is that model after
``adapt_steps`` SGD steps of size alpha on the device's training data (what the meta-objective
trained it for), in an order that depends on the device alone: deterministic, on any global
model (a rollback included). Nothing is kept between tasks but the settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from device.personal import Personaliser, Weights, seed_for
from edgefl.data import Dataset
from edgefl.messages import Task
from edgefl.models import get_weights, set_weights
from edgefl.training import Loop, TrainResult, train_local


def _endless(data: Dataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Minibatches of ``data`` for as long as they are asked for (D', apart from D's order)."""
    while len(data):
        yield from Loop(data, 1_000_000, batch_size, seed)


def meta_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    second: tuple[torch.Tensor, torch.Tensor],
    alpha: float,
    lr: float,
    prox: tuple[float, list[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One first-order Per-FedAvg step on ``model``; the loss and logits on ``batch`` at w."""
    params = list(model.parameters())
    logits = model(batch[0])
    loss = nn.functional.cross_entropy(logits, batch[1])
    inner = torch.autograd.grad(loss, params)
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        torch._foreach_add_(params, list(inner), alpha=-alpha)
    outer = torch.autograd.grad(nn.functional.cross_entropy(model(second[0]), second[1]), params)
    with torch.no_grad():
        step = list(outer)
        if prox is not None:
            mu, anchor = prox
            step = [g + mu * (w - a) for g, w, a in zip(step, saved, anchor, strict=True)]
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
        torch._foreach_add_(params, step, alpha=-lr)
    return loss, logits


class PerFedAvg(Personaliser):
    method = "perfedavg"

    def train(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data_train: Dataset
    ) -> tuple[Weights, TrainResult]:
        set_weights(self.model, base_weights)
        seed = seed_for(self.device_id, str(task.round))
        loop = Loop(data_train, task.epochs, task.batch_size, seed, task.max_steps)
        second = _endless(data_train, task.batch_size, seed ^ 0x5EED)
        alpha = self.settings.personal.perfedavg_alpha
        prox = (
            (task.prox_mu, [p.detach().clone() for p in self.model.parameters()])
            if task.prox_mu
            else None
        )
        self.model.train()
        for xb, yb in loop:
            loss, logits = meta_step(self.model, (xb, yb), next(second), alpha, task.lr, prox)
            loop.record(loss, logits, yb)
        result = loop.result()
        result.samples_seen *= 2  # two minibatches a step
        return get_weights(self.model), result

    def personalise(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        self._check(global_weights)
        model = self._fresh(global_weights)
        steps = self.settings.personal.adapt_steps
        batch = self.settings.batch_size
        if steps and len(self.data):
            epochs = math.ceil(steps / math.ceil(len(self.data) / batch))
            train_local(
                model,
                self.data,
                epochs=epochs,
                batch_size=batch,
                lr=self.settings.personal.perfedavg_alpha,
                seed=self.seed,
                max_steps=steps,
            )
        return get_weights(model)
