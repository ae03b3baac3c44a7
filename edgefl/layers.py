"""Layers the model catalogue (edgefl/models.py) needs that torch does not have in the form it
needs. Imported only when a model is built: the catalogue itself imports no torch."""

from __future__ import annotations

import torch
from torch import nn


class Unflatten(nn.Module):
    """Give each flat sample of a batch the shape ``shape``: (batch, features) to
    (batch, *shape).

    Every data set in edgefl hands models flat float32 rows, so that npz files, the ONNX input,
    serving and ``edgefl predict`` see one layout; a convolutional model unflattens inside.
    ``nn.Unflatten`` does the same but exports to ONNX as a dozen shape-arithmetic nodes
    (Shape, Slice, Concat, ...) that ONNX Runtime's quantisation pre-processing cannot infer
    shapes through; a reshape to a constant ``(-1, *shape)`` exports as one Reshape node.
    """

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
