"""The dense codecs: every value, little-endian, at full or half precision, one record per
tensor (name, shape, bytes)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from edgefl.compression.base import Codec, ModelSpec, check_finite, check_records, raw_values


class DenseCodec(Codec):
    """Every value, little-endian, at the codec's float width."""

    name = "dense_fp32"
    wire_id = 0
    dtype: ClassVar[np.dtype] = np.dtype("<f4")

    def encode(self, tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "shape": list(arr.shape),
                "data": np.ascontiguousarray(arr, dtype=self.dtype).tobytes(),
            }
            for name, arr in tensors.items()
        ]

    def decode(self, data: Any, spec: ModelSpec) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, shape, rec in check_records(data, spec):
            count = math.prod(shape)
            arr = raw_values(rec, name, self.dtype, count).astype(np.float32).reshape(shape)
            out[name] = arr
        check_finite(out)
        return out


class DenseFp16Codec(DenseCodec):
    """Half precision: half the bytes of fp32; values beyond +-65504 overflow and are rejected."""

    name = "fp16"
    wire_id = 1
    dtype = np.dtype("<f2")

    def encode(self, tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        for name, arr in tensors.items():
            if np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
                raise ValueError(f"tensor {name!r} does not fit in fp16")
        return super().encode(tensors)
