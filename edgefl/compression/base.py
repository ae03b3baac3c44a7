"""What every codec shares: the error type, the codec interface, and the model's flat layout.

A codec turns ``{name: float32 array}`` into something MessagePack can carry (a list of records,
or one ``bytes`` string) and back. ``decode`` is written for hostile input: every length, count
and value is checked against the model's expected shapes before anything is built, and any
inconsistency raises :class:`WireError` with a reason a log reader can act on.
"""

from __future__ import annotations

import functools
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import fields
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from edgefl.config import CodecConfig

# the [codec] table's defaults, read off its fields: building a CodecConfig validates it through
# this package, which is not loaded yet
DEFAULTS = SimpleNamespace(**{f.name: f.default for f in fields(CodecConfig)})
"""Every codec parameter's default, from the one place defaults live."""

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
    """Encodes a set of named float32 tensors for the wire, and decodes it back.

    ``wire_id`` names the codec in the compact update envelope (one byte instead of a string).
    ``PARAMS`` are the settings a spec may give (the fields of the same name in
    :class:`~edgefl.config.CodecConfig` are their defaults); every codec takes ``zstd``:
    whether the device tries zstd on the whole envelope (kept only when smaller).
    """

    name: ClassVar[str]
    wire_id: ClassVar[int]
    PARAMS: ClassVar[tuple[str, ...]] = ("zstd",)

    def __init__(self, *, zstd: bool = DEFAULTS.zstd) -> None:
        if not isinstance(zstd, bool):
            raise ValueError("zstd must be true or false")
        self.zstd = zstd

    def spec(self) -> dict[str, Any]:
        """The codec's name and every parameter it takes, as carried in tasks and model
        messages: what a receiver builds must not depend on its own defaults, which may not be
        the sender's (``make_codec(..., complete=True)`` insists on all of them)."""
        return {"name": self.name} | {p: getattr(self, p) for p in self.PARAMS}

    # a codec is its name and parameters (it holds no other state): two with the same spec are
    # the same codec, wherever they were built
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.spec().items())))

    def __repr__(self) -> str:
        return f"<codec {self.spec()}>"

    @abstractmethod
    def encode(self, tensors: Mapping[str, np.ndarray]) -> Any: ...

    @abstractmethod
    def decode(self, data: Any, spec: ModelSpec) -> dict[str, np.ndarray]: ...


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise WireError("nonfinite", f"tensor {name!r} holds NaN or Inf")


# ---------------------------------------------------------------------------------------------
# the model as one flat vector (tensors concatenated in spec order), which is how the
# compressing codecs index values


def num_values(spec: ModelSpec) -> int:
    # math.prod, not np.prod: a spec's shapes are a few tuples, and numpy's call overhead was a
    # fifth of decoding a small update
    return sum(math.prod(shape) for shape in spec.values())


def offsets(spec: ModelSpec) -> np.ndarray:
    """Start of each tensor in the flat vector, plus the end: ``len(spec) + 1`` entries."""
    ends = [0]
    for shape in spec.values():
        ends.append(ends[-1] + math.prod(shape))
    return np.array(ends, dtype=np.int64)


def flatten(tensors: Mapping[str, np.ndarray], spec: ModelSpec | None = None) -> np.ndarray:
    names = list(spec) if spec is not None else list(tensors)
    if not names:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(tensors[k], dtype=np.float32).ravel() for k in names])


def unflatten(flat: np.ndarray, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Tensors (copies) from a flat vector laid out as ``spec`` says."""
    out: dict[str, np.ndarray] = {}
    ends = offsets(spec)
    for i, (name, shape) in enumerate(spec.items()):
        out[name] = np.array(flat[ends[i] : ends[i + 1]], dtype=np.float32).reshape(shape)
    return out


@functools.lru_cache(maxsize=64)
def _spec_tag(items: tuple[tuple[str, tuple[int, ...]], ...]) -> int:
    text = ";".join(f"{k}:{'x'.join(map(str, s))}" for k, s in items)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:2], "big")


def spec_tag(spec: ModelSpec) -> int:
    """A 16-bit fingerprint of the tensor names and shapes.

    The compact envelope carries values, not names and shapes; this tag lets the decoder tell a
    device that runs another model with the same number of values (a mistake, not an attack:
    a hostile sender can always send a well-formed update).
    """
    return _spec_tag(tuple((k, tuple(s)) for k, s in spec.items()))


# ---------------------------------------------------------------------------------------------
# the per-tensor records of the dense codecs


def check_records(records: Any, spec: ModelSpec) -> list[tuple[str, tuple[int, ...], dict]]:
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


def raw_values(rec: dict, name: str, dtype: np.dtype, count: int) -> np.ndarray:
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
