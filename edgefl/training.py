"""Local training and evaluation: one short loop each, the same on a device and in a benchmark."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgefl.data import Dataset


@dataclass
class TrainResult:
    loss: float  # mean training loss over the last epoch
    accuracy: float  # training accuracy over the last epoch
    steps: int
    samples_seen: int
    seconds: float  # wall time of the loop
    cpu_seconds: float  # CPU time of the training thread


def train_local(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    max_steps: int = 0,
    prox_mu: float = 0.0,
) -> TrainResult:
    """Plain minibatch SGD on cross-entropy, reshuffling every epoch.

    The SGD step is written out rather than taken from ``torch.optim``: building the first
    optimizer in a process imports machinery that costs about 1.5 s and 75 MB on a device, for
    one line of arithmetic.

    ``prox_mu`` > 0 adds FedProx's proximal term mu/2 ||w - w0||^2 to the loss, w0 being the
    weights the training started from (Li et al., "Federated Optimization in Heterogeneous
    Networks", MLSys 2020): its gradient mu (w - w0) keeps unequal amounts of local work from
    drifting far from the global model.
    """
    start, cpu_start = time.perf_counter(), time.thread_time()
    X = torch.from_numpy(data.X)
    y = torch.from_numpy(data.y)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if prox_mu else []
    model.train()
    steps = seen = 0
    loss_sum = correct = count = 0.0
    for epoch in range(epochs):
        # the figures reported are those of the last epoch; earlier ones skip the bookkeeping
        last = epoch == epochs - 1
        loss_sum = correct = count = 0.0
        order = torch.randperm(len(y), generator=gen)
        Xs, ys = X[order], y[order]  # one gather per epoch; batches are then plain slices
        for i in range(0, len(ys), batch_size):
            xb, yb = Xs[i : i + batch_size], ys[i : i + batch_size]
            for p in params:
                p.grad = None
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            loss.backward()
            with torch.no_grad():
                grads = [p.grad for p in params]
                if prox_mu:
                    torch._foreach_add_(grads, torch._foreach_sub(params, anchor), alpha=prox_mu)
                # one call for every tensor: a device's model is small, so per-call overhead
                # is most of the cost of a step
                torch._foreach_add_(params, grads, alpha=-lr)
            steps += 1
            n = len(yb)
            seen += n
            if last or (max_steps and steps >= max_steps):
                loss_sum += loss.item() * n
                correct += (logits.argmax(1) == yb).sum().item()
                count += n
            if max_steps and steps >= max_steps:
                break
        if max_steps and steps >= max_steps:
            break
    return TrainResult(
        loss=loss_sum / max(count, 1),
        accuracy=correct / max(count, 1),
        steps=steps,
        samples_seen=seen,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.thread_time() - cpu_start,
    )


def local_steps(samples: int, epochs: int, batch_size: int, max_steps: int = 0) -> int:
    """How many SGD steps :func:`train_local` takes with these settings."""
    per_epoch = -(-samples // batch_size) if samples > 0 else 0
    steps = epochs * per_epoch
    return min(steps, max_steps) if max_steps else steps


def samples_for_steps(samples: int, batch_size: int, steps: int) -> int:
    """How many samples :func:`train_local` goes through in ``steps`` steps (only the last
    batch of an epoch is short, and ``steps`` full epochs plus fewer batches than an epoch)."""
    per_epoch = -(-samples // batch_size) if samples > 0 else 0
    if per_epoch == 0:
        return 0
    epochs, rest = divmod(steps, per_epoch)
    return epochs * samples + rest * batch_size


@torch.no_grad()
def predict_logits(model: nn.Module, X: np.ndarray) -> np.ndarray:
    model.train(False)  # inference mode: no dropout, no batch-norm statistics updated
    return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()


def evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """(loss, accuracy) on ``data``."""
    logits = predict_logits(model, data.X)
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(data.y)).item()
    return float(loss), float((logits.argmax(1) == data.y).mean())
