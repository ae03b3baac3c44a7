"""APFL, model mixing: Deng, Kamani and Mahdavi, "Adaptive Personalized Federated Learning"
(2020).

Each device keeps a local model v and a mixing weight alpha; its personal model is the mix of
its local model and the global one,

    v_bar = alpha v + (1 - alpha) w.

Every step of a task, on one minibatch (Algorithm 1 of the paper):

    w     <- w - lr grad f(w)                                (FedAvg's step; w is sent)
    v     <- v - lr_p alpha grad f(v_bar)                    (the gradient of f(v_bar) in v)

and, at the first step of each task, from the same v, w and alpha:

    alpha <- alpha - lr_p <v - w, grad f(v_bar)>             (the gradient in alpha)

kept within [0, 1]. Once a task, as the authors' implementation does (FedTorch, the code of the
paper: at the first local step of a round): there w is still the global model, so the gradient
compares the local model with the very model the personal one mixes it with. Later in the task
w has fitted the device's data too, and stepping alpha against it at every step drove alpha to 0
within the first task on the digits fleet (then v stops learning and the personal model is the
global one). lr is the task's learning rate, lr_p the personal one; alpha starts at
``apfl_alpha`` and is learned per device, so a device whose data the global model fits gives its
local model less weight. v starts as the first global model. The step count, cap and FedProx
term of the task apply to w as in plain training.

The personal model on any global model is the mix with the device's v and alpha: no training,
so it is rebuilt at once (a rollback included).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from device.personal import Personaliser, Weights, seed_for
from edgefl.data import Dataset
from edgefl.messages import Task
from edgefl.models import get_weights, set_weights
from edgefl.training import Loop, TrainResult

SLOT = "local"
ALPHA = "alpha"


def mix(v: Mapping[str, np.ndarray], w: Mapping[str, np.ndarray], alpha: float) -> Weights:
    """alpha v + (1 - alpha) w, tensor by tensor."""
    a = np.float32(alpha)
    return {
        k: a * np.asarray(v.get(k, w[k]), np.float32) + (1 - a) * np.asarray(w[k], np.float32)
        for k in w
    }


def _grads(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
    logits = model(xb)
    loss = nn.functional.cross_entropy(logits, yb)
    return loss, logits, torch.autograd.grad(loss, list(model.parameters()))


class APFL(Personaliser):
    method = "apfl"

    def _local(self, default: Mapping[str, np.ndarray]) -> tuple[Weights, float]:
        slots, scalars, _ = self._read()
        v = slots.get(SLOT) or {k: np.array(x, dtype=np.float32) for k, x in default.items()}
        return v, scalars.get(ALPHA, self.settings.personal.apfl_alpha)

    def train(
        self, task: Task, base_weights: Mapping[str, np.ndarray], data_train: Dataset
    ) -> tuple[Weights, TrainResult]:
        v_weights, alpha = self._local(base_weights)
        set_weights(self.model, base_weights)
        mixed = self._fresh(base_weights)  # holds v_bar at every step
        names = [k for k, _ in self.model.named_parameters()]
        w = list(self.model.parameters())
        m = list(mixed.parameters())
        v = [torch.from_numpy(np.array(v_weights[k], dtype=np.float32)) for k in names]
        anchor = [p.detach().clone() for p in w] if task.prox_mu else []
        lr, lr_p = task.lr, self.settings.lr
        loop = Loop(
            data_train,
            task.epochs,
            task.batch_size,
            seed_for(self.device_id, str(task.round)),
            task.max_steps,
        )
        self.model.train()
        mixed.train()
        for xb, yb in loop:
            with torch.no_grad():
                for mp, vp, wp in zip(m, v, w, strict=True):
                    mp.copy_(alpha * vp + (1 - alpha) * wp)
            loss, logits, g_w = _grads(self.model, xb, yb)
            _, _, g_m = _grads(mixed, xb, yb)
            with torch.no_grad():
                first = loop.steps == 0
                if first:
                    g_alpha = sum(
                        float(((vp - wp) * gm).sum()) for vp, wp, gm in zip(v, w, g_m, strict=True)
                    )
                if task.prox_mu:
                    g_w = [
                        g + task.prox_mu * (p - a) for g, p, a in zip(g_w, w, anchor, strict=True)
                    ]
                torch._foreach_add_(v, list(g_m), alpha=-lr_p * alpha)
                torch._foreach_add_(w, list(g_w), alpha=-lr)
                if first:
                    alpha = min(1.0, max(0.0, alpha - lr_p * g_alpha))
            loop.record(loss, logits, yb)
        result = loop.result()
        # the mixed model's passes cost as much again
        result.samples_seen *= 2
        self._commit(
            slots={SLOT: {k: t.numpy().copy() for k, t in zip(names, v, strict=True)}},
            scalars={ALPHA: alpha},
        )
        return get_weights(self.model), result

    def personalise(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        self._check(global_weights)
        v, alpha = self._local(global_weights)
        return mix(v, global_weights, alpha)
