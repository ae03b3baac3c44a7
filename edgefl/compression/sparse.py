"""The compressing codecs: dense int8, magnitude pruning and top-k sparsification, with their
kept values quantised, in one packed format.

A compressing codec sees the model's tensors as one flat vector (spec order), keeps some
positions, and sends them as one ``bytes`` string:

====================  =========================================================================
field                 content
====================  =========================================================================
flags (1 byte)        bits 0-2 value coding (0: 2-bit, 1: 4-bit, 2: 8-bit levels, 3: fp16,
                      4: fp32); bits 3-4 index coding (0 all, 1 bitmap, 2 varint gaps,
                      3 Rice gaps: :mod:`edgefl.compression.indices`); bit 5 scales are fp32
                      rather than fp16; bits 6-7 zero
k (varint)            number of values kept, ``0 <= k <= n``
block (varint)        levels only: kept values per scale; 0 = one scale per tensor that has any
positions             ``k`` positions in the index coding the flags name
scales                levels only: one per group, fp16 (or fp32), finite and not negative
values                ``k`` levels packed most significant bit first, or ``k`` fp16/fp32
====================  =========================================================================

Nothing else may follow. Levels and scales are those of :mod:`edgefl.compression.quantize`.

- ``int8``: every value at 8 bits (a quarter of fp32).
- ``prune``: magnitude pruning (Han et al., "Learning both Weights and Connections", NeurIPS
  2015, applied to updates as in Strom, Interspeech 2015): values of at least ``threshold``.
- ``topk``: the ``fraction`` of values largest in magnitude across all tensors (global top-k;
  Aji and Heafield, EMNLP 2017), with the sparsity warm-up of Deep Gradient Compression (Lin et
  al., ICLR 2018): in the first ``warmup_rounds`` rounds the kept fraction falls from 25 % by a
  factor of 4 per round to ``fraction``.

The codec only compresses what it is given. What the device feeds it (the delta plus the
residual of earlier rounds, with DGC's momentum correction and local clipping) is
:mod:`edgefl.error_feedback`; those settings travel in the codec's spec so that one task says
all of how a device encodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from edgefl.compression import indices, quantize
from edgefl.compression.base import (
    DEFAULTS,
    Codec,
    ModelSpec,
    WireError,
    flatten,
    num_values,
    offsets,
    unflatten,
)

_VALUE_CODES = {2: 0, 4: 1, 8: 2, 16: 3, 32: 4}
_BITS_OF = {code: bits for bits, code in _VALUE_CODES.items()}
_FP32_SCALES = 0x20
_RESERVED = 0xC0


# ---------------------------------------------------------------------------------------------
# the packed format


def _read_varint(buf: bytes, pos: int, what: str, limit: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise WireError("size", f"the packed payload ends inside {what}")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if value > limit:
                raise WireError("count", f"{what} = {value} is above {limit}")
            return value, pos + i + 1
    raise WireError("malformed", f"{what} is not a valid varint")


def pack_values(
    values: np.ndarray,
    idx: np.ndarray,
    n: int,
    tensor_offsets: np.ndarray,
    bits: int,
    block: int,
    rng: np.random.Generator,
) -> tuple[bytes, np.ndarray]:
    """The packed bytes for ``values`` at positions ``idx``, and the values as decoded."""
    coding, index_bytes = indices.encode(idx, n)
    k = len(idx)
    values = np.asarray(values, dtype=np.float32)
    if bits in quantize.FLOAT_BITS:
        dtype = quantize.FLOAT_BITS[bits]
        if bits == 16 and k and np.abs(values).max() > quantize.FP16_MAX:
            raise ValueError("kept values do not fit in fp16")
        flags = _VALUE_CODES[bits] | coding << 3
        body = values.astype(dtype).tobytes()
        sent = values.astype(dtype).astype(np.float32)
        return bytes([flags]) + indices.varint(k) + index_bytes + body, sent
    starts = quantize.group_starts(idx, block, tensor_offsets)
    scales, fp32 = quantize.scales_for(values, starts)
    codes = quantize.quantize(values, starts, scales, bits, rng)
    flags = _VALUE_CODES[bits] | coding << 3 | (_FP32_SCALES if fp32 else 0)
    scale_bytes = scales.astype("<f4" if fp32 else "<f2").tobytes()
    sent = quantize.dequantize(codes, starts, scales, bits)
    head = bytes([flags]) + indices.varint(k) + indices.varint(block)
    return head + index_bytes + scale_bytes + quantize.pack(codes, bits), sent


def unpack_values(data: Any, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, values)`` from a packed payload; WireError on any inconsistency."""
    if not isinstance(data, bytes):
        raise WireError("malformed", "a packed payload must be bytes")
    n = num_values(spec)
    if not data:
        raise WireError("size", "an empty packed payload")
    flags = data[0]
    if flags & _RESERVED:
        raise WireError("malformed", f"reserved flag bits set ({flags:#04x})")
    bits = _BITS_OF.get(flags & 0x07)
    if bits is None:
        raise WireError(
            "bits", f"value coding {flags & 0x07} is not one of 2, 4, 8 bits, fp16, fp32"
        )
    coding = (flags >> 3) & 0x03
    k, pos = _read_varint(data, 1, "the value count", n)
    block = 0
    if bits in quantize.QUANT_BITS:
        block, pos = _read_varint(data, pos, "the block size", max(n, 1))
    elif flags & _FP32_SCALES:
        raise WireError("malformed", "a float payload has no scales")
    idx, pos = indices.decode(coding, data, pos, k, n)
    if bits in quantize.FLOAT_BITS:
        dtype = quantize.FLOAT_BITS[bits]
        size = k * dtype.itemsize
        if len(data) - pos != size:
            raise WireError(
                "size", f"{len(data) - pos} bytes of values, {k} x {dtype} needs {size}"
            )
        values = np.frombuffer(data, dtype=dtype, count=k, offset=pos).astype(np.float32)
    else:
        starts = quantize.group_starts(idx, block, offsets(spec))
        scale_type = np.dtype("<f4" if flags & _FP32_SCALES else "<f2")
        need = len(starts) * scale_type.itemsize + quantize.packed_size(k, bits)
        if len(data) - pos != need:
            raise WireError(
                "size",
                f"{len(data) - pos} bytes of scales and values, {len(starts)} scales and {k} "
                f"values of {bits} bits need {need}",
            )
        scales = np.frombuffer(data, dtype=scale_type, count=len(starts), offset=pos)
        scales = scales.astype(np.float32)
        quantize.check_scales(scales)
        codes = quantize.unpack(data, pos + len(starts) * scale_type.itemsize, k, bits)
        values = quantize.dequantize(codes, starts, scales, bits)
    if not np.isfinite(values).all():
        raise WireError("nonfinite", "a kept value is NaN or Inf")
    return idx, values


# ---------------------------------------------------------------------------------------------
# the codecs


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class PackedCodec(Codec):
    """A codec whose payload is the packed format above; subclasses choose the positions."""

    # the parameters a spec may set (and a CodecConfig supplies), besides the name
    PARAMS: ClassVar[tuple[str, ...]] = (
        "block",
        "error_feedback",
        "momentum",
        "clip",
        "max_staleness",
        *Codec.PARAMS,
    )
    bits: int = 8

    def __init__(
        self,
        *,
        block: int = DEFAULTS.block,
        error_feedback: bool = DEFAULTS.error_feedback,
        momentum: float = DEFAULTS.momentum,
        clip: float = DEFAULTS.clip,
        max_staleness: int = DEFAULTS.max_staleness,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        _check(_is_count(block) and 0 <= block <= 1 << 24, f"block must be >= 0, got {block!r}")
        _check(isinstance(error_feedback, bool), "error_feedback must be true or false")
        _check(_is_number(momentum) and 0 <= momentum < 1, "momentum must be in [0, 1)")
        _check(_is_number(clip) and clip >= 0, "clip must be >= 0 (0 = off)")
        _check(
            _is_count(max_staleness) and max_staleness >= 1, "max_staleness must be an integer >= 1"
        )
        self.block = block
        self.error_feedback = error_feedback
        self.momentum = float(momentum)
        self.clip = float(clip)
        self.max_staleness = max_staleness

    def positions(self, flat: np.ndarray, round_: int | None = None) -> np.ndarray:
        """Which positions of ``flat`` to send, increasing."""
        return np.arange(len(flat), dtype=np.int64)

    def compress(
        self,
        flat: np.ndarray,
        spec: ModelSpec,
        rng: np.random.Generator,
        round_: int | None = None,
    ) -> tuple[bytes, np.ndarray, np.ndarray]:
        """``(payload, positions, values as the receiver will decode them)`` for ``flat``."""
        flat = np.asarray(flat, dtype=np.float32)
        n = num_values(spec)
        if flat.shape != (n,):
            raise ValueError(f"expected {n} values, got {flat.shape}")
        idx = self.positions(flat, round_)
        payload, sent = pack_values(flat[idx], idx, n, offsets(spec), self.bits, self.block, rng)
        return payload, idx, sent

    def encode(
        self, tensors: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> bytes:
        spec = {k: tuple(np.shape(v)) for k, v in tensors.items()}
        rng = rng if rng is not None else np.random.default_rng()
        return self.compress(flatten(tensors, spec), spec, rng)[0]

    def decode(self, data: Any, spec: ModelSpec) -> dict[str, np.ndarray]:
        idx, values = unpack_values(data, spec)
        flat = np.zeros(num_values(spec), dtype=np.float32)
        flat[idx] = values
        return unflatten(flat, spec)


class Int8Codec(PackedCodec):
    """Every value as an 8-bit level with per-tensor or per-block scales."""

    name = "int8"
    wire_id = 2
    bits = 8


class _SparseCodec(PackedCodec):
    PARAMS = ("bits", *PackedCodec.PARAMS)

    def __init__(self, *, bits: int = DEFAULTS.bits, **params: Any) -> None:
        _check(
            _is_count(bits) and bits in quantize.SUPPORTED_BITS,
            f"bits must be one of {', '.join(map(str, quantize.SUPPORTED_BITS))}, got {bits!r}",
        )
        super().__init__(**params)
        self.bits = bits


class PruneCodec(_SparseCodec):
    """Magnitude pruning: every value whose magnitude is at least ``threshold``."""

    name = "prune"
    wire_id = 3
    PARAMS = ("threshold", *_SparseCodec.PARAMS)

    def __init__(self, *, threshold: float = DEFAULTS.threshold, **params: Any) -> None:
        _check(_is_number(threshold) and threshold >= 0, "threshold must be >= 0")
        super().__init__(**params)
        self.threshold = float(threshold)

    def positions(self, flat: np.ndarray, round_: int | None = None) -> np.ndarray:
        mag = np.abs(flat)
        return np.flatnonzero((mag >= self.threshold) & (mag > 0)).astype(np.int64)


class TopKCodec(_SparseCodec):
    """Global top-k: the ``fraction`` of all values largest in magnitude (at least one)."""

    name = "topk"
    wire_id = 4
    PARAMS = ("fraction", "warmup_rounds", *_SparseCodec.PARAMS)

    def __init__(
        self,
        *,
        fraction: float = DEFAULTS.fraction,
        warmup_rounds: int = DEFAULTS.warmup_rounds,
        **params: Any,
    ) -> None:
        _check(_is_number(fraction) and 0 < fraction <= 1, "fraction must be in (0, 1]")
        _check(_is_count(warmup_rounds) and warmup_rounds >= 0, "warmup_rounds must be >= 0")
        super().__init__(**params)
        self.fraction = float(fraction)
        self.warmup_rounds = warmup_rounds

    def fraction_at(self, round_: int | None) -> float:
        """DGC's exponential warm-up: 25 %, 6.25 %, ... in the first rounds, then ``fraction``."""
        if round_ is not None and 1 <= round_ <= self.warmup_rounds:
            return max(self.fraction, 0.25**round_)
        return self.fraction

    def positions(self, flat: np.ndarray, round_: int | None = None) -> np.ndarray:
        n = len(flat)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        k = min(n, max(1, round(self.fraction_at(round_) * n)))
        if k == n:
            return np.arange(n, dtype=np.int64)
        top = np.argpartition(-np.abs(flat), k - 1)[:k]
        return np.sort(top).astype(np.int64)
