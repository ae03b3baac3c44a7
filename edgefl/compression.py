"""Tensor codecs: how a model delta (or the model itself) becomes bytes on the wire and back.

A codec turns ``{name: float32 array}`` into a list of plain records (maps of ints, floats,
strings and bytes, ready for MessagePack) and back. ``decode`` is written for hostile input: every
length, count and value is checked against the model's expected shapes before anything is built,
and any inconsistency raises :class:`WireError` with a reason a log reader can act on.

The dense codecs live here; the compressing pipeline (pruning, top-k, quantisation) plugs in
through the same :class:`Codec` interface and :func:`make_codec`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

ModelSpec = Mapping[str, tuple[int, ...]]
"""Tensor names in order, with their shapes: what a decoded payload must match."""


class WireError(ValueError):
    """A payload from the wire is malformed or inconsistent.

    ``reason`` is a short stable code (used for counting rejections); the message is for humans.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Codec(ABC):
    name: ClassVar[str]

    def spec(self) -> dict[str, Any]:
        """The codec's name and parameters, as carried in the envelope."""
        return {"name": self.name}

    @abstractmethod
    def encode(self, tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]: ...

    @abstractmethod
    def decode(self, records: Any, spec: ModelSpec) -> dict[str, np.ndarray]: ...


def _check_records(records: Any, spec: ModelSpec) -> list[tuple[str, tuple[int, ...], dict]]:
    """Names, shapes and order of the records against the model; returns them paired."""
    if not isinstance(records, list):
        raise WireError("malformed", "tensors must be a list")
    if len(records) != len(spec):
        raise WireError("tensor_count", f"{len(records)} tensors, the model has {len(spec)}")
    out = []
    for rec, (name, shape) in zip(records, spec.items(), strict=True):
        if not isinstance(rec, dict):
            raise WireError("malformed", "a tensor record is not a map")
        if rec.get("name") != name:
            raise WireError("tensor_name", f"expected tensor {name!r}, got {rec.get('name')!r}")
        got_shape = rec.get("shape")
        if not isinstance(got_shape, list) or tuple(got_shape) != tuple(shape):
            raise WireError(
                "shape", f"tensor {name!r} has shape {got_shape!r}, the model has {list(shape)}"
            )
        out.append((name, tuple(shape), rec))
    return out


def _raw(rec: dict, name: str, dtype: np.dtype, count: int) -> np.ndarray:
    data = rec.get("data")
    if not isinstance(data, bytes):
        raise WireError("malformed", f"tensor {name!r} has no data bytes")
    if len(data) != count * dtype.itemsize:
        raise WireError(
            "size",
            f"tensor {name!r} has {len(data)} bytes, {count} x {dtype} needs "
            f"{count * dtype.itemsize}",
        )
    return np.frombuffer(data, dtype=dtype)


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise WireError("nonfinite", f"tensor {name!r} holds NaN or Inf")


class DenseCodec(Codec):
    """Every value, little-endian, at the codec's float width."""

    name = "dense_fp32"
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

    def decode(self, records: Any, spec: ModelSpec) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, shape, rec in _check_records(records, spec):
            count = int(np.prod(shape, dtype=np.int64))
            arr = _raw(rec, name, self.dtype, count).astype(np.float32).reshape(shape)
            out[name] = arr
        check_finite(out)
        return out


class DenseFp16Codec(DenseCodec):
    """Half precision: half the bytes of fp32; values beyond +-65504 overflow and are rejected."""

    name = "fp16"
    dtype = np.dtype("<f2")

    def encode(self, tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        for name, arr in tensors.items():
            if np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
                raise ValueError(f"tensor {name!r} does not fit in fp16")
        return super().encode(tensors)


CODECS: dict[str, type[Codec]] = {c.name: c for c in (DenseCodec, DenseFp16Codec)}


def make_codec(spec: Mapping[str, Any] | str) -> Codec:
    """The codec a spec names (``{"name": ..., **params}``); WireError if unknown or invalid."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise WireError("codec", "codec spec must be a map")
    name = spec.get("name")
    cls = CODECS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise WireError("codec", f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        return cls(**params)
    except TypeError as e:
        raise WireError("codec", f"bad parameters for codec {name!r}: {e}") from None
