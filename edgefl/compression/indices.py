"""Which positions of the flat model a sparse update holds: four codings, the smallest wins.

The positions are strictly increasing integers in ``[0, n)``. The encoder writes every coding
that applies and keeps the shortest:

- ``all``: every position (a dense payload); no bytes at all.
- ``bitmap``: one bit per position, ``ceil(n / 8)`` bytes; best above roughly 1 in 8 kept.
- ``varint``: the gaps between positions as LEB128 varints (one byte per gap below 128).
- ``rice``: the gaps as Golomb-Rice codes (Golomb 1966; Rice 1979) with the parameter that
  makes them shortest, written in the first byte. Gaps between top-k positions are close to
  geometric, for which Golomb codes are the optimal prefix codes: about ``log2(n/k) + 1.5``
  bits per position, against 8 or more for varints.

Gaps are ``position - previous position`` with the previous of the first being -1, so a valid
gap is at least 1: a gap of 0 is a repeated position (``index_order``), and a position at or
beyond ``n`` is ``index_range``. Decoding reads a hostile buffer: each step is bounded by ``n``
and by the bytes that are there, and unused padding bits must be zero.
"""

from __future__ import annotations

import numpy as np

from edgefl.compression.base import WireError

ALL, BITMAP, VARINT, RICE = 0, 1, 2, 3
NAMES = {ALL: "all", BITMAP: "bitmap", VARINT: "varint", RICE: "rice"}
MAX_RICE = 40  # gaps are below 2**40: no model is that large
_ASCII_BITS = bytes.maketrans(b"\x00\x01", b"01")


def gaps(idx: np.ndarray) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64)
    return np.diff(idx, prepend=-1)


# ---------------------------------------------------------------------------------------------
# encoding


def varint(value: int) -> bytes:
    """One unsigned integer as a LEB128 varint: 7 bits a byte, low first, the top bit set on
    every byte but the last (MessagePack-free counts in the packed payload and the update's
    metrics, and MQTT's remaining length, use the same)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_bytes(values: np.ndarray) -> bytes:
    values = values.astype(np.uint64)
    if len(values) == 0:
        return b""
    lengths = np.ones(len(values), dtype=np.int64)
    for shift in range(7, 64, 7):
        lengths += values >= np.uint64(1 << shift)
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for j in range(int(lengths.max())):
        live = lengths > j
        byte = (values[live] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[live] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[live] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def _rice_size_bits(g: np.ndarray, r: int) -> int:
    return int((g >> r).sum()) + len(g) * (1 + r)


def _best_rice_parameter(g: np.ndarray) -> int:
    if len(g) == 0:
        return 0
    top = min(MAX_RICE, int(g.max()).bit_length())
    return min(range(top + 1), key=lambda r: _rice_size_bits(g, r))


def _rice_bytes(g: np.ndarray, r: int) -> bytes:
    q = g >> r
    lengths = q + 1 + r
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    bits = np.zeros(int(lengths.sum()), dtype=np.uint8)
    ones = int(q.sum())
    if ones:
        first = np.repeat(starts, q)
        within = np.arange(ones) - np.repeat(np.cumsum(q) - q, q)
        bits[first + within] = 1
    for j in range(r):
        bits[starts + q + 1 + j] = (g >> (r - 1 - j)) & 1
    return bytes([r]) + np.packbits(bits).tobytes()


def encode(idx: np.ndarray, n: int) -> tuple[int, bytes]:
    """``(coding, bytes)``: the shortest coding of the strictly increasing positions ``idx``."""
    idx = np.asarray(idx, dtype=np.int64)
    k = len(idx)
    if k and (idx[0] < 0 or idx[-1] >= n or (k > 1 and not (np.diff(idx) > 0).all())):
        raise ValueError("positions must be strictly increasing and within [0, n)")
    if k == n:
        return ALL, b""
    g = gaps(idx)
    options = [(VARINT, _varint_bytes(g))]
    if k:
        options.append((RICE, _rice_bytes(g, _best_rice_parameter(g))))
        bitmap = np.zeros(n, dtype=np.uint8)
        bitmap[idx] = 1
        options.append((BITMAP, np.packbits(bitmap).tobytes()))
    return min(options, key=lambda o: len(o[1]))


# ---------------------------------------------------------------------------------------------
# decoding (hostile input)


def _positions(g: np.ndarray, n: int) -> np.ndarray:
    if len(g) and g.min() < 1:
        raise WireError("index_order", "positions are not strictly increasing (a gap of 0)")
    idx = np.cumsum(g, dtype=np.int64) - 1
    if len(idx) and idx[-1] >= n:
        raise WireError("index_range", f"position {int(idx[-1])} is outside the model's {n}")
    return idx


def _decode_bitmap(buf: bytes, pos: int, k: int, n: int) -> tuple[np.ndarray, int]:
    size = (n + 7) // 8
    if len(buf) - pos < size:
        raise WireError("size", f"a bitmap of {n} positions needs {size} bytes")
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=size, offset=pos))
    if bits[n:].any():
        raise WireError("index_range", "bitmap bits set beyond the model's size")
    idx = np.flatnonzero(bits[:n]).astype(np.int64)
    if len(idx) != k:
        raise WireError("count", f"bitmap holds {len(idx)} positions, the header says {k}")
    return idx, pos + size


def _decode_varint(buf: bytes, pos: int, k: int, n: int) -> tuple[np.ndarray, int]:
    if k == 0:
        return np.zeros(0, dtype=np.int64), pos
    # a gap is below n, so no varint is longer than this; it also bounds what is looked at
    longest = max(1, (int(n).bit_length() + 6) // 7)
    window = np.frombuffer(buf, dtype=np.uint8, offset=pos)[: k * longest]
    ends = np.flatnonzero(window < 0x80)[:k]
    if len(ends) < k:
        raise WireError("count", f"fewer than the {k} position gaps the header says")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > longest:
        raise WireError("index_range", "a position gap is longer than the model")
    used = window[: ends[-1] + 1].astype(np.uint64) & np.uint64(0x7F)
    shift = (np.arange(len(used)) - np.repeat(starts, lengths)) * 7
    g = np.add.reduceat(used << shift.astype(np.uint64), starts).astype(np.int64)
    return _positions(g, n), pos + int(ends[-1]) + 1


def _decode_rice(buf: bytes, pos: int, k: int, n: int) -> tuple[np.ndarray, int]:
    if k == 0:
        return np.zeros(0, dtype=np.int64), pos
    if pos >= len(buf):
        raise WireError("size", "no Rice parameter")
    r = buf[pos]
    if r > MAX_RICE:
        raise WireError("malformed", f"Rice parameter {r} is above {MAX_RICE}")
    # at most k * (1 + r) bits of remainders and terminators plus n >> r quotient ones
    # (the gaps sum to less than n); never look further than that
    most = (k * (1 + r) + (n >> r) + 7) // 8
    raw = np.frombuffer(buf, dtype=np.uint8, offset=pos + 1)[:most]
    text = np.unpackbits(raw).tobytes().translate(_ASCII_BITS)
    limit = n >> r
    out = np.empty(k, dtype=np.int64)
    p = 0
    for i in range(k):
        z = text.find(b"0", p, p + limit + 1)
        if z < 0:
            if len(text) - p > limit:
                raise WireError("index_range", "a position gap is larger than the model")
            raise WireError("count", f"Rice codes end after {i} of the {k} positions")
        q = z - p
        p = z + 1 + r
        if p > len(text):
            raise WireError("count", f"Rice codes end after {i} of the {k} positions")
        out[i] = (q << r) | (int(text[z + 1 : p], 2) if r else 0)
    used = (p + 7) // 8
    if text[p : used * 8].count(b"1"):
        raise WireError("malformed", "padding bits after the Rice codes are not zero")
    return _positions(out, n), pos + 1 + used


def decode(coding: int, buf: bytes, pos: int, k: int, n: int) -> tuple[np.ndarray, int]:
    """The ``k`` positions coded at ``buf[pos:]``, and where the coding ends."""
    if not 0 <= k <= n:
        raise WireError("count", f"{k} values, the model has {n}")
    if coding == ALL:
        if k != n:
            raise WireError("count", f"a dense payload of {k} values, the model has {n}")
        return np.arange(n, dtype=np.int64), pos
    if coding == BITMAP:
        return _decode_bitmap(buf, pos, k, n)
    if coding == VARINT:
        return _decode_varint(buf, pos, k, n)
    if coding == RICE:
        return _decode_rice(buf, pos, k, n)
    raise WireError("malformed", f"unknown index coding {coding}")
