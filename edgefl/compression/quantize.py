"""Quantisation of kept values to 2, 4 or 8 bits with unbiased stochastic rounding.

Values are split into groups (one per tensor, or blocks of a fixed number of consecutive kept
values); each group has a scale ``s``, its largest magnitude rounded up to the next fp16 value
(so that the scale costs two bytes and still covers the group). A value ``v`` of the group is
sent as a level ``q`` in ``0 .. L`` with ``L = 2**bits - 1`` on the uniform grid
``-s + q * 2s / L``, rounded to one of its two neighbouring levels at random with the
probability that makes the expectation exactly ``v`` (stochastic rounding, as in QSGD: Alistarh
et al., NeurIPS 2017). Every code is used, so 2 bits give four levels, not a wasted fourth.

Dequantisation is a few float32 operations in a fixed order, so a device and the aggregator
that decode the same bytes get bit-identical values (what error feedback and the downlink delta
rely on).
"""

from __future__ import annotations

import numpy as np

from edgefl.compression.base import WireError

QUANT_BITS = (2, 4, 8)
FLOAT_BITS = {16: np.dtype("<f2"), 32: np.dtype("<f4")}
SUPPORTED_BITS = (*QUANT_BITS, *FLOAT_BITS)
FP16_MAX = float(np.finfo(np.float16).max)


def group_starts(idx: np.ndarray, block: int, tensor_offsets: np.ndarray) -> np.ndarray:
    """Where each scale's group starts among the ``len(idx)`` kept values.

    ``block`` > 0: every ``block`` values; 0: one group per tensor that has kept values.
    """
    k = len(idx)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if block > 0:
        return np.arange(0, k, block, dtype=np.int64)
    tensor = np.searchsorted(tensor_offsets, idx, side="right") - 1
    return np.flatnonzero(np.diff(tensor, prepend=-1) != 0).astype(np.int64)


def _round_up_fp16(s: np.ndarray) -> np.ndarray:
    half = s.astype(np.float16)
    low = half.astype(np.float32) < s
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half.astype(np.float32)


def scales_for(values: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, bool]:
    """Each group's scale (float32), and whether they need fp32 (a magnitude above fp16's)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.float32), False
    peak = np.maximum.reduceat(np.abs(values), starts).astype(np.float32)
    if peak.max() > FP16_MAX:
        return peak, True
    return _round_up_fp16(peak), False


def _steps(scales: np.ndarray, bits: int) -> np.ndarray:
    return np.float32(2.0) * scales / np.float32(2**bits - 1)


def quantize(
    values: np.ndarray, starts: np.ndarray, scales: np.ndarray, bits: int, rng: np.random.Generator
) -> np.ndarray:
    """Levels (uint8) for ``values`` on each group's grid, stochastically rounded."""
    k = len(values)
    if k == 0:
        return np.zeros(0, dtype=np.uint8)
    counts = np.diff(np.append(starts, k))
    s = np.repeat(scales, counts)
    step = np.repeat(_steps(scales, bits), counts)
    safe = np.where(step > 0, step, np.float32(1.0))
    x = np.where(step > 0, (values.astype(np.float32) + s) / safe, np.float32(0.0))
    low = np.floor(x)
    q = low + (rng.random(k, dtype=np.float32) < (x - low))
    return np.clip(q, 0, 2**bits - 1).astype(np.uint8)


def dequantize(codes: np.ndarray, starts: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    counts = np.diff(np.append(starts, len(codes)))
    step = np.repeat(_steps(scales, bits), counts)
    return codes.astype(np.float32) * step - np.repeat(scales, counts)


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Levels of ``bits`` each, most significant bit first, padded with zeros to a byte."""
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    per = 8 // bits
    padded = np.zeros(-(-len(codes) // per) * per, dtype=np.uint8)
    padded[: len(codes)] = codes
    grouped = padded.reshape(-1, per)
    shifts = np.arange(per - 1, -1, -1, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(grouped << shifts, axis=1).astype(np.uint8).tobytes()


def packed_size(k: int, bits: int) -> int:
    return (k * bits + 7) // 8


def unpack(buf: bytes, pos: int, k: int, bits: int) -> np.ndarray:
    size = packed_size(k, bits)
    if len(buf) - pos < size:
        raise WireError("size", f"{k} values of {bits} bits need {size} bytes")
    raw = np.frombuffer(buf, dtype=np.uint8, count=size, offset=pos)
    if bits == 8:
        return raw.copy()
    per = 8 // bits
    shifts = np.arange(per - 1, -1, -1, dtype=np.uint8) * bits
    codes = ((raw[:, None] >> shifts) & np.uint8(2**bits - 1)).ravel()
    if codes[k:].any():
        raise WireError("malformed", "padding bits after the values are not zero")
    return codes[:k]


def check_scales(scales: np.ndarray) -> None:
    if not np.isfinite(scales).all():
        raise WireError("scale", "a quantisation scale is NaN or infinite")
    if (scales < 0).any():
        raise WireError("scale", "a quantisation scale is negative")
