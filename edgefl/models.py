"""Models by name, and the conversion between a torch model and named numpy weights.

Models output logits; the loss (cross-entropy) applies the softmax, and so does whoever wants
probabilities at inference. Keeping softmax out of the graph keeps the ONNX export and the int8
variant simple.

The catalogue (:func:`model_info`) imports no torch: a serve-only device, which has no torch,
reads its model's input shape and classes from it. Only building and copying weights need torch.
"""

from __future__ import annotations

from collections import OrderedDict
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


def _conv(inputs: int, outputs: int, kernel: int, dims: int) -> int:
    """Parameters of a convolution: a kernel of ``kernel**dims`` taps per input and output
    channel, and a bias per output channel."""
    return outputs * inputs * kernel**dims + outputs


def _dense(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def _cnn_fmnist() -> ModelInfo:
    """A CNN for 28x28 grey images (Fashion-MNIST), 10 classes: 117,066 parameters.

    LeNet-5's layout (LeCun et al., "Gradient-based learning applied to document recognition",
    Proc. IEEE 1998) with wider layers: conv 1->16 5x5 (padding 2, 28x28 stays 28x28), ReLU,
    max-pool 2 (14x14), conv 16->32 5x5 (10x10), ReLU, max-pool 2 (5x5), dense 800->128, ReLU,
    dense 128->10. It is McMahan et al.'s FedAvg CNN (2017: 32 and 64 channels, dense 512,
    1.66M parameters) shrunk to the low end of what a Pi-class fleet trains: 1.7M multiply-adds
    a sample, and one epoch over 3,000 samples (a device's share of Fashion-MNIST among 20) at
    batch 32 takes about 1.0 s on one x86 core, so 20 simulated devices train on 2 cores in a
    benchmark's time. Padding the second convolution too (215,370 parameters, 3.0M multiply-
    adds) costs a quarter more time; a 64-wide dense layer (65,162) saves almost none.
    No batch normalisation: its running statistics are not weights FedAvg can average, and its
    batch counter is not float32.
    """

    def build() -> nn.Module:
        from torch import nn

        from edgefl.layers import Unflatten

        return nn.Sequential(
            OrderedDict(
                image=Unflatten(1, 28, 28),
                conv1=nn.Conv2d(1, 16, 5, padding=2),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(16, 32, 5),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flat=nn.Flatten(),
                fc1=nn.Linear(32 * 5 * 5, 128),
                relu3=nn.ReLU(),
                fc2=nn.Linear(128, 10),
            )
        )

    parameters = _conv(1, 16, 5, 2) + _conv(16, 32, 5, 2) + _dense(800, 128) + _dense(128, 10)
    return ModelInfo("cnn_fmnist", (784,), 10, build, parameters)


def _cnn_watch() -> ModelInfo:
    """A 1-D CNN for smartwatch motion windows, 6 channels (accelerometer and gyroscope, 3 axes
    each) x 100 samples (2 s at 50 Hz), 7 classes: 15,911 parameters.

    conv 6->32 k5 (padding 2), ReLU, max-pool 2 (50 steps), conv 32->64 k5 (padding 2), ReLU,
    global max pool over time, dense 64->64, ReLU, dense 64->7: the usual shape of a
    human-activity-recognition CNN (convolutions along time over all sensor channels at once),
    kept small because the data are: about 4,700 windows from 10 wearers. The global max pool
    keeps each filter's strongest response wherever in the window the movement falls. Trained
    centrally on seglearn's watch data (windows of 100 with stride 50, each channel
    standardised; 15 epochs; leave-two-subjects-out, 5 folds x 3 seeds), it reached 0.81 test
    accuracy, against 0.77 with a global average pool and 0.79 with a max-pool 2 and a dense
    layer over the whole window (114,215 parameters).
    """

    def build() -> nn.Module:
        from torch import nn

        from edgefl.layers import Unflatten

        return nn.Sequential(
            OrderedDict(
                window=Unflatten(6, 100),
                conv1=nn.Conv1d(6, 32, 5, padding=2),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool1d(2),
                conv2=nn.Conv1d(32, 64, 5, padding=2),
                relu2=nn.ReLU(),
                pool2=nn.AdaptiveMaxPool1d(1),
                flat=nn.Flatten(),
                fc1=nn.Linear(64, 64),
                relu3=nn.ReLU(),
                fc2=nn.Linear(64, 7),
            )
        )

    parameters = _conv(6, 32, 5, 1) + _conv(32, 64, 5, 1) + _dense(64, 64) + _dense(64, 7)
    return ModelInfo("cnn_watch", (600,), 7, build, parameters)


MODELS: dict[str, ModelInfo] = {
    # B1: digits are 8x8 = 64 features
    "mlp_digits": _mlp("mlp_digits", 64, 128, 10),
    # 28x28 images (MNIST-shaped data a user brings)
    "mlp_mnist": _mlp("mlp_mnist", 784, 128, 10),
    # Fashion-MNIST: 784 features, a 28x28 image row-major; 117,066 parameters (2 conv, 2 dense)
    "cnn_fmnist": _cnn_fmnist(),
    # smartwatch motion: 600 features, 6 channels x 100 time steps (channel-major); 15,911
    # parameters (2 conv, 2 dense)
    "cnn_watch": _cnn_watch(),
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


# -- the shared / personal split (FedPer, FedRep: device/personal/fedper.py) -------------------


def _layers(spec: Mapping[str, tuple[int, ...]]) -> list[list[str]]:
    """The spec's keys grouped by layer (the module prefix: ``fc2`` of ``fc2.weight``), in
    state-dict order."""
    groups: dict[str, list[str]] = {}
    for key in spec:
        groups.setdefault(key.rpartition(".")[0], []).append(key)
    return list(groups.values())


def personal_keys(model: str | Mapping[str, tuple[int, ...]], layers: int) -> tuple[str, ...]:
    """The state-dict keys of the last ``layers`` layers that hold parameters: what FedPer and
    FedRep keep on the device. ``model`` is a model's name or its spec (model_spec). Our models
    hold no buffers, so every key of the spec is a parameter; at least one layer must stay
    shared. ``layers`` 0: none."""
    spec = model_spec(build_model(model)) if isinstance(model, str) else model
    groups = _layers(spec)
    if layers < 0 or layers >= len(groups):
        raise ValueError(
            f"personal_layers {layers}: the model has {len(groups)} layers with parameters, "
            "and at least one must stay shared"
        )
    return tuple(k for group in groups[len(groups) - layers :] for k in group)


def shared_spec(
    spec: Mapping[str, tuple[int, ...]], layers: int
) -> dict[str, tuple[int, ...]]:
    """``spec`` without its last ``layers`` layers: what an update carries and the aggregator
    aggregates when those layers stay on the devices (``layers`` 0: the whole spec)."""
    personal = set(personal_keys(spec, layers))
    return {k: tuple(v) for k, v in spec.items() if k not in personal}
