"""The update envelope (device -> aggregator): a device's delta for one round, compactly.

At 100x compression a whole update is a few hundred bytes, so the envelope carries its fields by
position, without names:

    byte 0    COMPACT_MAGIC, 0xC1: a byte MessagePack never uses, so no other message starts so
    byte 1    bits 0-3 the format version (checks.FORMAT_VERSION); bit 4: the rest is one zstd
              frame (edgefl/compression/frame.py: used only when it is smaller); bits 5-7 zero
    the rest  a MessagePack array [device, round, base, n, model tag, codec id, metrics,
              tensors], optionally followed by a map of metrics the table below does not know

The model tag is compression.spec_tag of the model (names and shapes are not sent); the codec
id is the codec's wire_id (decoding needs no parameters: a packed payload describes itself);
tensors are what the codec encodes. Metrics are packed by the table below: a 16-bit mask of
those present, then each in its wire type (a value its type cannot hold goes to the map).
Times travel as float32 seconds after a reference sent as unix milliseconds modulo 2**32,
which the decoder places within 24 days of its own clock.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from edgefl.compression import CODECS_BY_WIRE_ID, Codec, ModelSpec, WireError, spec_tag
from edgefl.compression.frame import compress_if_smaller, decompress
from edgefl.compression.indices import varint
from edgefl.messages import checks
from edgefl.messages.checks import FORMAT_VERSION, MAX_METRICS


@dataclass
class Update:
    """A device's contribution to one round: the delta from the base model, and what it cost."""

    device_id: str
    round: int
    base_version: int
    num_samples: int
    delta: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    codec: dict[str, Any] = field(default_factory=lambda: {"name": "dense_fp32"})


COMPACT_MAGIC = 0xC1
_ZSTD = 0x10
_VERSION_BITS = 0x0F
_FIELDS = ("device", "round", "base", "n", "tag", "codec", "metrics", "tensors", "extra")
_METRIC_WIRE: tuple[tuple[str, str], ...] = (
    ("train_s", "f4"),
    ("samples_seen", "uint"),
    ("t_task", "time"),
    ("t_start", "time"),
    ("t_end", "time"),
    ("loss", "f2"),
    ("accuracy", "f2"),
    ("cpu_s", "f4"),
    ("steps", "uint"),
    ("battery_pct", "f2"),
    ("charging", "uint"),
    # personalised models (device/personal/): accuracies on the device's held-out split
    # (float32: the benchmark compares devices, which half precision would round together)
    ("personal_acc", "f4"),
    ("global_acc", "f4"),
    ("holdout_samples", "uint"),
)
_METRIC_BIT = {key: bit for bit, (key, _) in enumerate(_METRIC_WIRE)}
_TIME_BITS = sum(1 << bit for bit, (_, wire) in enumerate(_METRIC_WIRE) if wire == "time")
_MS_WRAP = 1 << 32


def encode_compact_update(
    update: Update, codec: Codec, spec: ModelSpec, tensors: Any = None
) -> bytes:
    """The envelope's bytes; ``tensors`` lets a caller pass what it already encoded."""
    data = tensors if tensors is not None else codec.encode(update.delta)
    metrics, extra = _pack_metrics(update.metrics)
    fields: list[Any] = [
        update.device_id,
        update.round,
        update.base_version,
        update.num_samples,
        spec_tag(spec),
        codec.wire_id,
        metrics,
        data,
    ]
    if extra:
        fields.append(extra)
    body = msgpack.packb(fields, use_bin_type=True)
    framed = compress_if_smaller(body) if codec.zstd else None
    flags = FORMAT_VERSION | (_ZSTD if framed is not None else 0)
    return bytes([COMPACT_MAGIC, flags]) + (framed if framed is not None else body)


def decode_update(
    payload: bytes,
    *,
    topic_device_id: str,
    spec: ModelSpec,
    expect_round: int | None = None,
    expect_base: int | None = None,
    max_bytes: int = 8 << 20,
    max_samples: int = 10_000_000,
) -> Update:
    """The only way an update gets in: every field checked, or WireError with the reason."""
    what = "update"
    if not isinstance(payload, (bytes, bytearray)):
        raise WireError("malformed", "payload is not bytes")
    if len(payload) > max_bytes:
        raise WireError("too_large", f"{len(payload)} bytes, the limit is {max_bytes}")
    if len(payload) < 3:
        raise WireError("malformed", f"an update of {len(payload)} bytes")
    if payload[0] != COMPACT_MAGIC:
        raise WireError(
            "malformed",
            f"not an update envelope: it starts with {payload[0]:#04x}, not {COMPACT_MAGIC:#04x}",
        )
    flags = payload[1]
    if flags & ~(_VERSION_BITS | _ZSTD):
        raise WireError("malformed", f"reserved flag bits set in an update ({flags:#04x})")
    checks.check_version(flags & _VERSION_BITS, what)
    body = bytes(payload[2:])
    if flags & _ZSTD:
        body = decompress(body, max_bytes)
    obj = checks.unpack_any(body, max_bytes)
    if not isinstance(obj, list) or not len(_FIELDS) - 1 <= len(obj) <= len(_FIELDS):
        raise WireError("malformed", "an update must be an array of 8 or 9 fields")
    fields = dict(zip(_FIELDS, obj, strict=False))
    device_id = checks.name(fields, "device", what)
    if device_id != topic_device_id:
        raise WireError(
            "device_mismatch", f"envelope says device {device_id!r}, topic says {topic_device_id!r}"
        )
    rnd = checks.count(fields, "round", what)
    base = checks.count(fields, "base", what)
    if expect_round is not None and rnd != expect_round:
        raise WireError("round", f"update for round {rnd}, the open round is {expect_round}")
    if expect_base is not None and base != expect_base:
        raise WireError(
            "base_version", f"update against model v{base}, the round uses v{expect_base}"
        )
    n = checks.count(fields, "n", what, lo=1, hi=max_samples)
    if checks.count(fields, "tag", what, hi=0xFFFF) != spec_tag(spec):
        raise WireError("shape", "the update is for another model (tensor names or shapes differ)")
    codec_id = fields["codec"]
    cls = CODECS_BY_WIRE_ID.get(codec_id) if type(codec_id) is int else None  # not True, not []
    if cls is None:
        raise WireError("codec", f"unknown codec id {str(codec_id)[:20]}")
    metrics = _unpack_metrics(fields["metrics"], time.time())
    if "extra" in fields:
        metrics.update(checks.metrics(fields["extra"], what))
    if len(metrics) > MAX_METRICS:
        raise WireError("malformed", f"{what}: more than {MAX_METRICS} metrics")
    checks.check_metric_ranges(metrics, what)
    delta = cls().decode(fields["tensors"], spec)
    return Update(device_id, rnd, base, n, delta, metrics, {"name": cls.name})


# ---------------------------------------------------------------------------------------------
# metrics by the table


def _pack_metric(value: float, wire: str, t0_ms: int | None) -> bytes | None:
    """``value`` in its wire type, or None if that type cannot hold it."""
    if not math.isfinite(value):
        return None
    if wire == "uint":
        ok = value == int(value) and 0 <= value <= 2**53
        return varint(int(value)) if ok else None
    if wire == "time":
        if t0_ms is None:
            return None
        value -= t0_ms / 1000.0
        wire = "f4"
    try:  # struct, not numpy: this runs for every metric of every update
        return struct.pack("<e" if wire == "f2" else "<f", value)
    except (OverflowError, struct.error):  # too large for the type: it goes to the map
        return None


def _pack_metrics(metrics: Mapping[str, float]) -> tuple[bytes, dict[str, float]]:
    """The packed metrics, and those that go to the map instead."""
    times = [
        float(metrics[k])
        for k, wire in _METRIC_WIRE
        if wire == "time" and k in metrics and math.isfinite(metrics[k]) and metrics[k] >= 0
    ]
    t0_ms = math.floor(min(times) * 1000) if times else None
    mask, packed_by_bit, extra = 0, {}, {}
    for key, value in metrics.items():
        bit = _METRIC_BIT.get(key)
        packed = None if bit is None else _pack_metric(float(value), _METRIC_WIRE[bit][1], t0_ms)
        if packed is None:
            extra[key] = float(value)
        else:
            mask |= 1 << bit
            packed_by_bit[bit] = packed
    parts = [packed_by_bit[bit] for bit in sorted(packed_by_bit)]
    head = mask.to_bytes(2, "little")
    if mask & _TIME_BITS:
        head += (t0_ms % _MS_WRAP).to_bytes(4, "little")
    return head + b"".join(parts), extra


def _unpack_metrics(blob: Any, now: float) -> dict[str, float]:
    what = "update metrics"
    if not isinstance(blob, bytes) or len(blob) < 2:
        raise WireError("malformed", f"{what} must be bytes holding at least a mask")
    mask = int.from_bytes(blob[:2], "little")
    if mask >> len(_METRIC_WIRE):
        raise WireError("malformed", f"{what}: unknown metrics in the mask ({mask:#06x})")
    pos, t0 = 2, 0.0
    if mask & _TIME_BITS:
        if len(blob) < 6:
            raise WireError("malformed", f"{what}: no time reference")
        sent = int.from_bytes(blob[2:6], "little")
        now_ms = math.floor(now * 1000)
        t0 = (now_ms + (sent - now_ms + _MS_WRAP // 2) % _MS_WRAP - _MS_WRAP // 2) / 1000.0
        pos = 6
    out: dict[str, float] = {}
    for bit, (key, wire) in enumerate(_METRIC_WIRE):
        if not mask >> bit & 1:
            continue
        if wire == "uint":
            value = shift = 0
            for i in range(9):
                if pos + i >= len(blob):
                    raise WireError("malformed", f"{what}: truncated at {key!r}")
                byte = blob[pos + i]
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    pos += i + 1
                    break
            else:
                raise WireError("malformed", f"{what}: {key!r} is not a valid varint")
            if value > 2**53:
                raise WireError("malformed", f"{what}: {key!r} is out of range")
            out[key] = float(value)
            continue
        size = 2 if wire == "f2" else 4
        if pos + size > len(blob):
            raise WireError("malformed", f"{what}: truncated at {key!r}")
        (value,) = struct.unpack_from("<e" if wire == "f2" else "<f", blob, pos)
        if not math.isfinite(value):
            raise WireError("malformed", f"{what}: metric {key!r} must be a finite number")
        out[key] = t0 + value if wire == "time" else value
        pos += size
    if pos != len(blob):
        raise WireError("malformed", f"{what}: {len(blob) - pos} bytes left over")
    return out
