"""Models by name, and the conversion between a torch model and named numpy weights.

Models output logits; the loss (cross-entropy) applies the softmax, and so does whoever wants
probabilities at inference. Keeping softmax out of the graph keeps the ONNX export and the int8
variant simple.

The catalogue (:func:`model_info`) imports no torch: a serve-only device, which has no torch,
reads its model's input shape and classes from it. Only building and copying weights need torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    name: str
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    num_classes: int
    build: Callable[[], nn.Module]
    # float32 parameters: what a dense update or model weighs (the broker's packet limit
    # follows from it, on a host that may have no torch)
    parameters: int


def _mlp(name: str, inputs: int, hidden: int, classes: int) -> ModelInfo:
    def build() -> nn.Module:
        from torch import nn

        return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    parameters = inputs * hidden + hidden + hidden * classes + classes
    return ModelInfo(name, (inputs,), classes, build, parameters)


MODELS: dict[str, ModelInfo] = {
    # B1: digits are 8x8 = 64 features
    "mlp_digits": _mlp("mlp_digits", 64, 128, 10),
    # 28x28 images (MNIST-shaped data a user brings)
    "mlp_mnist": _mlp("mlp_mnist", 784, 128, 10),
}


def model_info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model; with ``seed`` its initial weights are reproducible."""
    import torch

    info = model_info(name)
    if seed is None:
        return info.build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return info.build()


def model_spec(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in state_dict order: what every payload must match."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
    }


def set_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` into the model's own tensors (every name must be there, shapes equal).

    A plain copy per tensor: ``load_state_dict`` does the same with several times the
    overhead, which a device pays every round."""
    import torch

    state = model.state_dict(keep_vars=True)
    if set(state) != set(weights):
        raise ValueError(f"weights for {sorted(weights)}, the model has {sorted(state)}")
    sources = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in state}
    for k, t in state.items():  # all checked before any is copied: never half a model
        if sources[k].shape != tuple(t.shape):
            raise ValueError(f"{k}: shape {sources[k].shape}, the model has {tuple(t.shape)}")
    with torch.no_grad():
        for k, t in state.items():
            t.copy_(torch.from_numpy(sources[k]))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
