"""Local training and evaluation: one short loop each, the same on a device and in a benchmark."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping
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
    anchor: Mapping[str, np.ndarray] | None = None,
    train_only: Collection[str] | None = None,
) -> TrainResult:
    """Plain minibatch SGD on cross-entropy, reshuffling every epoch.

    The SGD step is written out rather than taken from ``torch.optim``: building the first
    optimizer in a process imports machinery that costs about 1.5 s and 75 MB on a device, for
    one line of arithmetic.

    ``prox_mu`` > 0 adds FedProx's proximal term mu/2 ||w - w0||^2 to the loss, w0 being the
    weights the training started from (Li et al., "Federated Optimization in Heterogeneous
    Networks", MLSys 2020): its gradient mu (w - w0) keeps unequal amounts of local work from
    drifting far from the global model. ``anchor`` (named weights) puts the proximal term's
    centre elsewhere: Ditto pulls a personal model towards the global one
    (device/personal/ditto.py).

    ``train_only`` (parameter names) trains those alone and leaves the rest as they are, with
    no gradient computed for them: FedRep's head and body steps (device/personal/fedper.py).
    """
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if train_only is not None:
        frozen = [p for k, p in named if k not in train_only]
        named = [(k, p) for k, p in named if k in train_only]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return _sgd(model, data, named, epochs, batch_size, lr, seed, max_steps, prox_mu,
                        anchor)
        finally:
            for p in frozen:
                p.requires_grad_(True)
    return _sgd(model, data, named, epochs, batch_size, lr, seed, max_steps, prox_mu, anchor)


def _sgd(
    model: nn.Module,
    data: Dataset,
    named: list[tuple[str, torch.Tensor]],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_steps: int,
    prox_mu: float,
    centre: Mapping[str, np.ndarray] | None,
) -> TrainResult:
    loop = Loop(data, epochs, batch_size, seed, max_steps)
    params = [p for _, p in named]
    anchor: list[torch.Tensor] = []
    if prox_mu:
        anchor = [
            torch.from_numpy(np.asarray(centre[k], dtype=np.float32)).reshape(p.shape)
            if centre is not None
            else p.detach().clone()
            for k, p in named
        ]
    model.train()
    for xb, yb in loop:
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
        loop.record(loss, logits, yb)
    return loop.result()


class Loop:
    """The minibatches of local training, and the figures it reports: ``epochs`` passes over
    ``data``, reshuffled every epoch in an order ``seed`` fixes, stopping after ``max_steps``
    steps (0: no cap). Iterate it for (x, y) batches and :meth:`record` every step; the loss
    and accuracy reported are those of the last epoch (or of the last step, when the cap cuts
    an epoch short). Training loops of their own (device/personal/) share it."""

    def __init__(
        self, data: Dataset, epochs: int, batch_size: int, seed: int = 0, max_steps: int = 0
    ) -> None:
        self.data, self.epochs, self.batch_size = data, epochs, batch_size
        self.seed, self.max_steps = seed, max_steps
        self.steps = self.seen = 0
        self.loss_sum = self.correct = self.count = 0.0
        self._last = False
        self._start, self._cpu_start = time.perf_counter(), time.thread_time()

    def _capped(self) -> bool:
        return bool(self.max_steps) and self.steps >= self.max_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        X = torch.from_numpy(self.data.X)
        y = torch.from_numpy(self.data.y)
        gen = torch.Generator().manual_seed(self.seed)
        for epoch in range(self.epochs):
            # earlier epochs skip the bookkeeping
            self._last = epoch == self.epochs - 1
            self.loss_sum = self.correct = self.count = 0.0
            order = torch.randperm(len(y), generator=gen)
            Xs, ys = X[order], y[order]  # one gather per epoch; batches are then plain slices
            for i in range(0, len(ys), self.batch_size):
                if self._capped():
                    return
                yield Xs[i : i + self.batch_size], ys[i : i + self.batch_size]

    def record(self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None:
        """One step done on batch ``yb``, with its loss and logits."""
        self.steps += 1
        n = len(yb)
        self.seen += n
        if self._last or self._capped():
            self.loss_sum += loss.item() * n
            self.correct += (logits.argmax(1) == yb).sum().item()
            self.count += n

    def result(self) -> TrainResult:
        return TrainResult(
            loss=self.loss_sum / max(self.count, 1),
            accuracy=self.correct / max(self.count, 1),
            steps=self.steps,
            samples_seen=self.seen,
            seconds=time.perf_counter() - self._start,
            cpu_seconds=time.thread_time() - self._cpu_start,
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
