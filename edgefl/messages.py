"""Every message edgefl puts on MQTT, typed, with the one place each is encoded and validated.

Binary messages (the update envelope, the global model) are MessagePack maps; control messages
(status, telemetry, tasks) are JSON so that ``mosquitto_sub`` shows them readably. Neither decoder
can run code: MessagePack extension types are refused and JSON has none.

Everything read from the wire goes through a ``decode``/``from_payload`` here and either comes
out as a valid object or raises :class:`~edgefl.compression.WireError` with a reason code.
The rest of edgefl handles only valid objects.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack
import numpy as np

from edgefl.chunking import Blob
from edgefl.compression import (
    CODECS_BY_WIRE_ID,
    Codec,
    ModelSpec,
    WireError,
    make_codec,
    spec_tag,
)
from edgefl.compression.frame import compress_if_smaller, decompress
from edgefl.config import NAME_RE

FORMAT_VERSION = 1
UPDATE_FORMAT = "edgefl.update"
MODEL_FORMAT = "edgefl.model"
MAX_CONTROL_BYTES = 64 * 1024
MAX_METRICS = 32
# bounds for what devices say about themselves: everything the aggregator keeps (its registry,
# checkpoints, metrics) stays within what JSON, MessagePack and the scheduler's arithmetic hold
MAX_COUNT = 2**53
MAX_SAMPLES = 10**9
MAX_TIME = 1e11  # unix seconds: the year 5138
MAX_CODECS = 16


# ---------------------------------------------------------------------------------------------
# field checks shared by the decoders


def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in d:
        raise WireError("malformed", f"{what} has no {key!r}")
    value = d[key]
    # bool is an int in Python; on the wire a flag is never a count
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise WireError("malformed", f"{what}: {key!r} must be a number, got {value!r}")
    if not isinstance(value, kind):
        raise WireError("malformed", f"{what}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _count(d: Mapping[str, Any], key: str, what: str, lo: int = 0, hi: int = 2**53) -> int:
    value = _get(d, key, int, what)
    if not lo <= value <= hi:
        raise WireError("malformed", f"{what}: {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def _number(
    d: Mapping[str, Any], key: str, what: str, lo: float = -math.inf, hi: float = math.inf
) -> float:
    try:
        value = float(_get(d, key, (int, float), what))
    except OverflowError:  # a JSON integer too large for a float
        value = math.inf
    if not math.isfinite(value) or not lo <= value <= hi:
        raise WireError("malformed", f"{what}: {key!r} = {value} is not finite or out of range")
    return value


def _optional_number(d: Mapping[str, Any], key: str, what: str, lo: float, hi: float):
    if d.get(key) is None:
        return None
    return _number(d, key, what, lo, hi)


def _name(d: Mapping[str, Any], key: str, what: str) -> str:
    value = _get(d, key, str, what)
    if not NAME_RE.match(value):
        raise WireError("malformed", f"{what}: {key!r} = {value[:80]!r} is not a valid name")
    return value


# The ranges of the metrics a device reports; what the aggregator does with them (throughput,
# battery policy, energy) must never see a value outside these. Others must be finite and
# within +-OTHER_METRIC_LIMIT.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "train_s": (0.0, 1e6),
    "cpu_s": (0.0, 1e7),
    "samples_seen": (0.0, 1e12),
    "steps": (0.0, 1e9),
    "t_task": (0.0, 1e11),
    "t_start": (0.0, 1e11),
    "t_end": (0.0, 1e11),
    "loss": (0.0, 1e30),
    "accuracy": (0.0, 1.0),
    "battery_pct": (0.0, 100.0),
    "charging": (0.0, 1.0),
}
OTHER_METRIC_LIMIT = 1e30
# printable ASCII without spaces: agent versions, machine names
TOKEN_RE = re.compile(r"^[!-~]*\Z")


def _check_metric_ranges(metrics: Mapping[str, float], what: str) -> dict[str, float]:
    for k, v in metrics.items():
        lo, hi = METRIC_RANGES.get(k, (-OTHER_METRIC_LIMIT, OTHER_METRIC_LIMIT))
        if not lo <= v <= hi:
            raise WireError(
                "malformed", f"{what}: metric {k[:64]!r} = {v:g} is outside [{lo:g}, {hi:g}]"
            )
    return dict(metrics)


def _metrics(value: Any, what: str) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise WireError("malformed", f"{what}: metrics must be a map of at most {MAX_METRICS}")
    out: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not 0 < len(k) <= 64 or not TOKEN_RE.match(k):
            raise WireError("malformed", f"{what}: metric names must be short printable strings")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise WireError("malformed", f"{what}: metric {k!r} must be a finite number")
        try:
            out[k] = float(v)
        except OverflowError:  # an integer too large for a float
            out[k] = math.inf
        if not math.isfinite(out[k]):
            raise WireError("malformed", f"{what}: metric {k!r} must be a finite number")
    return _check_metric_ranges(out, what)


def _text(d: Mapping[str, Any], key: str, what: str, max_len: int, token: bool = False) -> str:
    """A string field: at most ``max_len`` characters, no control characters, encodable as
    UTF-8 (JSON can carry lone surrogates, which no log file or checkpoint can); with ``token``
    printable ASCII without spaces."""
    value = d.get(key, "")
    if not isinstance(value, str):
        raise WireError("malformed", f"{what}: {key!r} must be a string")
    if len(value) > max_len:
        raise WireError("malformed", f"{what}: {key!r} is longer than {max_len} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError("malformed", f"{what}: {key!r} is not valid text") from None
    if (token and not TOKEN_RE.match(value)) or not value.isprintable():
        raise WireError("malformed", f"{what}: {key!r} holds characters it may not")
    return value


def _flag(d: Mapping[str, Any], key: str, what: str, default: bool | None) -> bool | None:
    value = d.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise WireError("malformed", f"{what}: {key!r} must be true or false")
    return value


def _check_version(obj: Mapping[str, Any], what: str) -> None:
    version = obj.get("v")
    if type(version) is not int or version != FORMAT_VERSION:  # not True, not 1.0
        raise WireError(
            "version",
            f"{what} format version {str(version)[:20]}, this build reads {FORMAT_VERSION}",
        )


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError("malformed", f"MessagePack extension type {code} is not allowed")


def _refuse_timestamp(container: Any) -> Any:
    # msgpack decodes extension type -1 (Timestamp) itself, without calling ext_hook
    items = container.values() if isinstance(container, dict) else container
    if any(isinstance(x, msgpack.Timestamp) for x in items):
        raise WireError("malformed", "MessagePack extension type -1 is not allowed")
    return container


def _unpack_any(payload: bytes, max_bytes: int) -> Any:
    if not isinstance(payload, (bytes, bytearray)):
        raise WireError("malformed", "payload is not bytes")
    if len(payload) > max_bytes:
        raise WireError("too_large", f"{len(payload)} bytes, the limit is {max_bytes}")
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            object_hook=_refuse_timestamp,
            list_hook=_refuse_timestamp,
        )
    except WireError:
        raise
    except Exception as e:  # msgpack raises several types for truncated or invalid input
        raise WireError("malformed", f"not a MessagePack document ({type(e).__name__})") from None
    if isinstance(obj, msgpack.Timestamp):
        raise WireError("malformed", "MessagePack extension type -1 is not allowed")
    return obj


def unpack(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """MessagePack map from untrusted bytes: size-capped, no extension types, string keys."""
    obj = _unpack_any(payload, max_bytes)
    if not isinstance(obj, dict):
        raise WireError("malformed", "payload is not a MessagePack map")
    return obj


def _codec_spec(spec: Any) -> dict[str, Any]:
    """The codec spec as a map, once make_codec has accepted it (it also takes a bare name)."""
    return {"name": spec} if isinstance(spec, str) else dict(spec)


def _check_header(obj: Mapping[str, Any], fmt: str) -> None:
    if obj.get("fmt") != fmt:
        raise WireError("malformed", f"not an {fmt} message (fmt={str(obj.get('fmt'))[:40]!r})")
    _check_version(obj, fmt)


# ---------------------------------------------------------------------------------------------
# the update envelope (device -> aggregator)


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


def encode_update(update: Update, codec: Codec, records: list[dict] | None = None) -> bytes:
    """The envelope's bytes. ``records`` lets a caller pass tensors it has already encoded."""
    return msgpack.packb(
        {
            "fmt": UPDATE_FORMAT,
            "v": FORMAT_VERSION,
            "device": update.device_id,
            "round": update.round,
            "base": update.base_version,
            "n": update.num_samples,
            "metrics": update.metrics,
            "codec": codec.spec(),
            "tensors": records if records is not None else codec.encode(update.delta),
            "ts": time.time(),
        },
        use_bin_type=True,
    )


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
    """The only way an update gets in: every field checked, or WireError with the reason.

    Reads both envelopes: the compact one (its first byte is ``COMPACT_MAGIC``) and the
    MessagePack map of format version 1.
    """
    if isinstance(payload, (bytes, bytearray)) and payload[:1] == bytes([COMPACT_MAGIC]):
        return _decode_compact_update(
            bytes(payload),
            topic_device_id=topic_device_id,
            spec=spec,
            expect_round=expect_round,
            expect_base=expect_base,
            max_bytes=max_bytes,
            max_samples=max_samples,
        )
    obj = unpack(payload, max_bytes)
    _check_header(obj, UPDATE_FORMAT)
    what = "update"
    device_id = _name(obj, "device", what)
    if device_id != topic_device_id:
        raise WireError(
            "device_mismatch", f"envelope says device {device_id!r}, topic says {topic_device_id!r}"
        )
    rnd = _count(obj, "round", what)
    base = _count(obj, "base", what)
    if expect_round is not None and rnd != expect_round:
        raise WireError("round", f"update for round {rnd}, the open round is {expect_round}")
    if expect_base is not None and base != expect_base:
        raise WireError(
            "base_version", f"update against model v{base}, the round uses v{expect_base}"
        )
    n = _count(obj, "n", what, lo=1, hi=max_samples)
    metrics = _metrics(obj.get("metrics", {}), what)
    codec_spec = obj.get("codec")
    codec = make_codec(codec_spec)
    delta = codec.decode(obj.get("tensors"), spec)
    return Update(device_id, rnd, base, n, delta, metrics, _codec_spec(codec_spec))


# ---------------------------------------------------------------------------------------------
# the compact update envelope (device -> aggregator)
#
# At 100x compression a whole update is a few hundred bytes, and the map keys, metric names and
# float64 times of the version 1 envelope would be most of it. The compact envelope carries the
# same fields by position:
#
#   byte 0    COMPACT_MAGIC, 0xC1: a byte MessagePack never uses, so no version 1 map starts so
#   byte 1    bits 0-3 the compact format version (1); bit 4: the rest is one zstd frame
#             (edgefl/compression/frame.py: used only when it is smaller); bits 5-7 zero
#   the rest  a MessagePack array [device, round, base, n, model tag, codec id, metrics,
#             tensors], optionally followed by a map of metrics the table below does not know
#
# The model tag is compression.spec_tag of the model (names and shapes are not sent); the codec
# id is the codec's wire_id (decoding needs no parameters: a packed payload describes itself);
# tensors are what the codec encodes. Metrics are packed by the table below: a 16-bit mask of
# those present, then each in its wire type (a value its type cannot hold goes to the map).
# Times travel as float32 seconds after a reference sent as unix milliseconds modulo 2**32,
# which the decoder places within 24 days of its own clock.

COMPACT_MAGIC = 0xC1
COMPACT_VERSION = 1
_COMPACT_ZSTD = 0x10
_COMPACT_FIELDS = ("device", "round", "base", "n", "tag", "codec", "metrics", "tensors", "extra")
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
)
_METRIC_BIT = {key: bit for bit, (key, _) in enumerate(_METRIC_WIRE)}
_TIME_BITS = sum(1 << bit for bit, (_, wire) in enumerate(_METRIC_WIRE) if wire == "time")
_MS_WRAP = 1 << 32


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _pack_metric(value: float, wire: str, t0_ms: int | None) -> bytes | None:
    """``value`` in its wire type, or None if that type cannot hold it."""
    if not math.isfinite(value):
        return None
    if wire == "uint":
        ok = value == int(value) and 0 <= value <= 2**53
        return _varint(int(value)) if ok else None
    if wire == "time":
        if t0_ms is None:
            return None
        value -= t0_ms / 1000.0
        wire = "f4"
    try:  # struct, not numpy: this runs for every metric of every update
        return struct.pack("<e" if wire == "f2" else "<f", value)
    except (OverflowError, struct.error):  # too large for the type: it goes to the map
        return None


def _pack_compact_metrics(metrics: Mapping[str, float]) -> tuple[bytes, dict[str, float]]:
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


def _unpack_compact_metrics(blob: Any, now: float) -> dict[str, float]:
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


def encode_compact_update(
    update: Update, codec: Codec, spec: ModelSpec, tensors: Any = None
) -> bytes:
    """The compact envelope's bytes; ``tensors`` lets a caller pass what it already encoded."""
    data = tensors if tensors is not None else codec.encode(update.delta)
    metrics, extra = _pack_compact_metrics(update.metrics)
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
    flags = COMPACT_VERSION | (_COMPACT_ZSTD if framed is not None else 0)
    return bytes([COMPACT_MAGIC, flags]) + (framed if framed is not None else body)


def _decode_compact_update(
    payload: bytes,
    *,
    topic_device_id: str,
    spec: ModelSpec,
    expect_round: int | None,
    expect_base: int | None,
    max_bytes: int,
    max_samples: int,
) -> Update:
    if len(payload) > max_bytes:
        raise WireError("too_large", f"{len(payload)} bytes, the limit is {max_bytes}")
    if len(payload) < 3:
        raise WireError("malformed", "a compact update of less than 3 bytes")
    flags = payload[1]
    if flags & ~(0x0F | _COMPACT_ZSTD):
        raise WireError("malformed", f"reserved flag bits set in a compact update ({flags:#04x})")
    if flags & 0x0F != COMPACT_VERSION:
        raise WireError(
            "version", f"compact format version {flags & 0x0F}, this build reads {COMPACT_VERSION}"
        )
    body = payload[2:]
    if flags & _COMPACT_ZSTD:
        body = decompress(body, max_bytes)
    obj = _unpack_any(body, max_bytes)
    if not isinstance(obj, list) or not 8 <= len(obj) <= len(_COMPACT_FIELDS):
        raise WireError("malformed", "a compact update must be an array of 8 or 9 fields")
    fields = dict(zip(_COMPACT_FIELDS, obj, strict=False))
    what = "update"
    device_id = _name(fields, "device", what)
    if device_id != topic_device_id:
        raise WireError(
            "device_mismatch", f"envelope says device {device_id!r}, topic says {topic_device_id!r}"
        )
    rnd = _count(fields, "round", what)
    base = _count(fields, "base", what)
    if expect_round is not None and rnd != expect_round:
        raise WireError("round", f"update for round {rnd}, the open round is {expect_round}")
    if expect_base is not None and base != expect_base:
        raise WireError(
            "base_version", f"update against model v{base}, the round uses v{expect_base}"
        )
    n = _count(fields, "n", what, lo=1, hi=max_samples)
    if _count(fields, "tag", what, hi=0xFFFF) != spec_tag(spec):
        raise WireError("shape", "the update is for another model (tensor names or shapes differ)")
    codec_id = fields["codec"]
    cls = CODECS_BY_WIRE_ID.get(codec_id) if type(codec_id) is int else None  # not True, not []
    if cls is None:
        raise WireError("codec", f"unknown codec id {str(codec_id)[:20]}")
    metrics = _unpack_compact_metrics(fields["metrics"], time.time())
    if "extra" in fields:
        metrics.update(_metrics(fields["extra"], what))
    if len(metrics) > MAX_METRICS:
        raise WireError("malformed", f"{what}: more than {MAX_METRICS} metrics")
    _check_metric_ranges(metrics, what)
    delta = cls().decode(fields["tensors"], spec)
    return Update(device_id, rnd, base, n, delta, metrics, {"name": cls.name})


# ---------------------------------------------------------------------------------------------
# the global model (aggregator -> devices, retained)


@dataclass
class GlobalModel:
    version: int
    round: int
    model: str
    weights: dict[str, np.ndarray]
    sha256: str = ""
    # the aggregator sends each next version as a delta on model/delta (devices that hold this
    # one may stop reading model/global; see device/model_sync.py)
    deltas: bool = False


def encode_model(msg: GlobalModel, codec: Codec, data: Any = None) -> bytes:
    """The model message; ``data`` lets a caller pass the weights it has already encoded."""
    body = msgpack.packb(data if data is not None else codec.encode(msg.weights), use_bin_type=True)
    digest = hashlib.sha256(body).hexdigest()
    msg.sha256 = digest
    obj = {
        "fmt": MODEL_FORMAT,
        "v": FORMAT_VERSION,
        "version": msg.version,
        "round": msg.round,
        "model": msg.model,
        "codec": codec.spec(),
        "sha256": digest,
        "body": body,
        "ts": time.time(),
    }
    if msg.deltas:
        obj["deltas"] = True
    return msgpack.packb(obj, use_bin_type=True)


def decode_model(payload: bytes, *, spec: ModelSpec, model: str, max_bytes: int = 64 << 20):
    """The global model from its retained message, its SHA-256 verified."""
    obj = unpack(payload, max_bytes)
    _check_header(obj, MODEL_FORMAT)
    what = "global model"
    version = _count(obj, "version", what)
    rnd = _count(obj, "round", what)
    name = _get(obj, "model", str, what)
    if name != model:
        raise WireError("model", f"global model is {name[:64]!r}, this device runs {model!r}")
    body = _get(obj, "body", bytes, what)
    digest = _get(obj, "sha256", str, what)
    if hashlib.sha256(body).hexdigest() != digest:
        raise WireError("checksum", "SHA-256 of the model body does not match")
    deltas = obj.get("deltas", False)
    if not isinstance(deltas, bool):
        raise WireError("malformed", f"{what}: 'deltas' must be true or false")
    codec = make_codec(obj.get("codec"))
    records = _unpack_any(body, max_bytes)
    if not isinstance(records, (list, bytes)):  # records, or one packed payload
        raise WireError("malformed", "model body is not a list of tensors")
    weights = codec.decode(records, spec)
    return GlobalModel(version, rnd, name, weights, digest, deltas)


MODEL_DELTA_FORMAT = "edgefl.model_delta"


def weights_digest(weights: Mapping[str, np.ndarray], spec: ModelSpec) -> str:
    """SHA-256 of the weights as little-endian float32 in spec order: the model's identity."""
    h = hashlib.sha256()
    for name in spec:
        h.update(np.ascontiguousarray(weights[name], dtype="<f4").tobytes())
    return h.hexdigest()


def apply_delta(
    base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``base + delta`` in float32: the one computation the aggregator and every device share,
    so that both arrive at bit-identical weights."""
    return {k: (np.asarray(base[k], dtype=np.float32) + delta[k]).astype(np.float32) for k in base}


@dataclass
class ModelDelta:
    """The change from global model ``base`` to ``version`` (aggregator -> devices, on
    model/delta, QoS 1, not retained).

    ``target_sha256`` is :func:`weights_digest` of the model it leads to: a device that applied
    it to anything else than the aggregator's ``base`` finds out, and fetches the full model
    rather than train on weights the aggregator does not have.
    """

    version: int
    base: int
    round: int
    model: str
    delta: dict[str, np.ndarray]
    target_sha256: str
    codec: dict[str, Any] = field(default_factory=lambda: {"name": "dense_fp32"})


def encode_model_delta(msg: ModelDelta, codec: Codec, data: Any = None) -> bytes:
    return msgpack.packb(
        {
            "fmt": MODEL_DELTA_FORMAT,
            "v": FORMAT_VERSION,
            "version": msg.version,
            "base": msg.base,
            "round": msg.round,
            "model": msg.model,
            "codec": codec.spec(),
            "target": msg.target_sha256,
            "body": data if data is not None else codec.encode(msg.delta),
            "ts": time.time(),
        },
        use_bin_type=True,
    )


def decode_model_delta(
    payload: bytes, *, spec: ModelSpec, model: str, max_bytes: int = 64 << 20
) -> ModelDelta:
    obj = unpack(payload, max_bytes)
    _check_header(obj, MODEL_DELTA_FORMAT)
    what = "model delta"
    version = _count(obj, "version", what)
    base = _count(obj, "base", what)
    if version <= base:
        raise WireError("malformed", f"{what} from v{base} to v{version}")
    name = _get(obj, "model", str, what)
    if name != model:
        raise WireError("model", f"model delta is for {name[:64]!r}, this device runs {model!r}")
    target = _get(obj, "target", str, what)
    if len(target) != 64 or any(c not in "0123456789abcdef" for c in target):
        raise WireError("malformed", f"{what}: 'target' is not a SHA-256 in hex")
    codec_spec = obj.get("codec")
    codec = make_codec(codec_spec)
    delta = codec.decode(obj.get("body"), spec)
    return ModelDelta(
        version, base, _count(obj, "round", what), name, delta, target, _codec_spec(codec_spec)
    )


# ---------------------------------------------------------------------------------------------
# control messages (JSON)


def _load_json(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL_BYTES:
        raise WireError("too_large", f"{what} of {len(payload)} bytes")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
        raise WireError("malformed", f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise WireError("malformed", f"{what} is not a JSON object")
    return obj


def _dump_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class Task:
    """What the aggregator asks of one device in one round."""

    round: int
    base_version: int
    epochs: int
    batch_size: int
    lr: float
    codec: dict[str, Any]
    deadline: float  # unix time by which the update must have arrived
    max_steps: int = 0  # 0 = no cap beyond the epochs
    issued: float = field(default_factory=time.time)
    prox_mu: float = 0.0  # FedProx proximal term weight; 0 = none

    def to_payload(self) -> bytes:
        # field by field, not asdict (a deep copy): one task per participant per round
        return _dump_json({"v": FORMAT_VERSION, **{k: getattr(self, k) for k in _TASK_FIELDS}})

    @classmethod
    def from_payload(cls, payload: bytes) -> Task:
        obj = _load_json(payload, "task")
        if obj.get("v") != FORMAT_VERSION:
            raise WireError("version", f"task format {obj.get('v')!r}")
        what = "task"
        codec = obj.get("codec")
        make_codec(codec)  # refuse a codec this build cannot produce
        return cls(
            round=_count(obj, "round", what),
            base_version=_count(obj, "base_version", what),
            epochs=_count(obj, "epochs", what, 0, 1000),
            batch_size=_count(obj, "batch_size", what, 1, 1 << 16),
            lr=_number(obj, "lr", what, 0.0, 100.0),
            codec=_codec_spec(codec),
            deadline=_number(obj, "deadline", what, 0.0),
            max_steps=_count(obj, "max_steps", what, 0, 10_000_000) if "max_steps" in obj else 0,
            issued=_number(obj, "issued", what, 0.0),
            prox_mu=_number(obj, "prox_mu", what, 0.0, 100.0) if "prox_mu" in obj else 0.0,
        )


@dataclass
class Telemetry:
    """A device's resources right now; None where the hardware cannot say."""

    cpu_percent: float
    mem_available_mb: float
    samples: int
    battery_percent: float | None = None
    charging: bool | None = None
    temperature_c: float | None = None
    link_kbps: float | None = None
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return _dump_json({"v": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_payload(cls, payload: bytes) -> Telemetry:
        obj = _load_json(payload, "telemetry")
        _check_version(obj, "telemetry")
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Telemetry:
        what = "telemetry"
        _only_keys(obj, TELEMETRY_KEYS, what)
        return cls(
            cpu_percent=_number(obj, "cpu_percent", what, 0.0, 100.0 * 1024),
            mem_available_mb=_number(obj, "mem_available_mb", what, 0.0, 1e9),
            samples=_count(obj, "samples", what, 0, MAX_SAMPLES),
            battery_percent=_optional_number(obj, "battery_percent", what, 0.0, 100.0),
            charging=_flag(obj, "charging", what, None),
            temperature_c=_optional_number(obj, "temperature_c", what, -100.0, 200.0),
            link_kbps=_optional_number(obj, "link_kbps", what, 0.0, 1e9),
            ts=_number(obj, "ts", what, 0.0, MAX_TIME),
        )


@dataclass
class Status:
    """A device's birth certificate or its Last Will.

    A birth (``online``) carries the device's capabilities, a first telemetry reading (so the
    aggregator can schedule it before its first periodic report) and the ONNX model version it
    serves, if any. The Will is a bare ``offline``.
    """

    state: str  # "online" | "offline"
    agent_version: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    telemetry: Telemetry | None = None
    serving: int | None = None  # version of the ONNX model the device serves
    serving_accuracy: float | None = None  # that model's accuracy on the device's own data
    serving_seq: int | None = None  # the deployment (rollout or rollback) it came with
    previous_accuracy: float | None = None  # the model served before, on the same data
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        obj = {"v": FORMAT_VERSION, **asdict(self)}
        return _dump_json(obj)

    @classmethod
    def from_payload(cls, payload: bytes) -> Status:
        obj = _load_json(payload, "status")
        what = "status"
        _check_version(obj, what)
        _only_keys(obj, STATUS_KEYS, what)
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise WireError("malformed", f"status state {str(state)[:20]!r}")
        caps = capabilities_from(obj.get("capabilities", {}))
        version = _text(obj, "agent_version", what, 64, token=True)
        telemetry = obj.get("telemetry")
        if telemetry is not None:
            if not isinstance(telemetry, dict):
                raise WireError("malformed", "telemetry in a status must be an object")
            telemetry = Telemetry.from_dict(telemetry)
        serving = obj.get("serving")
        return cls(
            state=state,
            agent_version=version,
            capabilities=caps,
            telemetry=telemetry,
            serving=None if serving is None else _count(obj, "serving", what, 0, MAX_COUNT),
            serving_accuracy=_optional_number(obj, "serving_accuracy", what, 0.0, 1.0),
            serving_seq=None if obj.get("serving_seq") is None else _count(
                obj, "serving_seq", what, 0, MAX_COUNT
            ),
            previous_accuracy=_optional_number(obj, "previous_accuracy", what, 0.0, 1.0),
            ts=_number(obj, "ts", what, 0.0, MAX_TIME) if "ts" in obj else 0.0,
        )


@dataclass
class AggregatorStatus:
    """Retained on aggregator/status: alive or not, and where the training stands."""

    state: str  # "online" | "offline" | "finished"
    round: int = 0
    model_version: int = 0
    reported: int = 0
    expected: int = 0
    accuracy: float | None = None
    # devices cut off at the broker (aggregator/guard.py), for operators
    quarantined: list[str] = field(default_factory=list)
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return _dump_json({"v": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_payload(cls, payload: bytes) -> AggregatorStatus:
        obj = _load_json(payload, "aggregator status")
        what = "aggregator status"
        state = obj.get("state")
        if state not in ("online", "offline", "finished"):
            raise WireError("malformed", f"aggregator state {state!r}")
        return cls(
            state=state,
            round=_count(obj, "round", what) if "round" in obj else 0,
            model_version=_count(obj, "model_version", what) if "model_version" in obj else 0,
            reported=_count(obj, "reported", what) if "reported" in obj else 0,
            expected=_count(obj, "expected", what) if "expected" in obj else 0,
            accuracy=_optional_number(obj, "accuracy", what, 0.0, 1.0),
            quarantined=_device_ids(obj, "quarantined", what),
            ts=_number(obj, "ts", what, 0.0) if "ts" in obj else 0.0,
        )


def _device_ids(obj: Mapping[str, Any], key: str, what: str) -> list[str]:
    ids = obj.get(key, [])
    if not isinstance(ids, list) or not all(isinstance(i, str) and NAME_RE.match(i) for i in ids):
        raise WireError("malformed", f"{what}: {key!r} must be a list of device ids")
    return ids


MAX_ONNX_BYTES = 64 << 20
VARIANTS = ("fp32", "int8")


@dataclass
class Deployment:
    """A rollout manifest, retained on model/onnx (what the fleet serves) or on
    model/onnx/canary (what the listed canary devices try first). The ONNX file itself travels
    as a chunked blob (edgefl/chunking.py) named by its SHA-256."""

    version: int  # the global model version it was exported from
    round: int
    model: str
    variant: str  # "fp32" or "int8"
    sha256: str
    size: int
    chunk_size: int
    chunks: int
    seq: int  # grows with every rollout and rollback, so a rollback is news to the devices
    metadata: dict[str, str] = field(default_factory=dict)
    canaries: list[str] = field(default_factory=list)
    ts: float = field(default_factory=time.time)

    @property
    def blob(self) -> Blob:
        return Blob(self.sha256, self.size, self.chunk_size, self.chunks)

    def to_payload(self) -> bytes:
        return _dump_json({"v": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_payload(
        cls, payload: bytes, *, model: str, max_bytes: int = MAX_ONNX_BYTES
    ) -> Deployment:
        obj = _load_json(payload, "deployment")
        what = "deployment"
        if type(obj.get("v")) is not int or obj["v"] != FORMAT_VERSION:
            raise WireError("version", f"deployment format {obj.get('v')!r}")
        name = _get(obj, "model", str, what)
        if name != model:
            raise WireError("model", f"deployment is for {name[:64]!r}, this device runs {model!r}")
        variant = obj.get("variant")
        if variant not in VARIANTS:
            raise WireError("malformed", f"deployment variant {variant!r}")
        meta = obj.get("metadata", {})
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise WireError("malformed", "deployment metadata must map strings to strings")
        canaries = obj.get("canaries", [])
        if not isinstance(canaries, list) or not all(
            isinstance(c, str) and NAME_RE.match(c) for c in canaries
        ):
            raise WireError("malformed", "canaries must be a list of device ids")
        dep = cls(
            version=_count(obj, "version", what),
            round=_count(obj, "round", what),
            model=name,
            variant=variant,
            sha256=_get(obj, "sha256", str, what),
            size=_count(obj, "size", what, 1, max_bytes),
            chunk_size=_count(obj, "chunk_size", what, 1, max_bytes),
            chunks=_count(obj, "chunks", what, 1),
            seq=_count(obj, "seq", what),
            metadata=meta,
            canaries=canaries,
            ts=_number(obj, "ts", what, 0.0) if "ts" in obj else 0.0,
        )
        dep.blob.check(max_bytes)
        return dep


# ---------------------------------------------------------------------------------------------
# resource-aware rounds: a device's power model, and its replies other than an update


@dataclass(frozen=True)
class PowerModel:
    """What a device draws, for energy estimates; carried in its birth as capabilities.power."""

    compute_w: float  # while training
    radio_w: float  # while uploading
    battery_wh: float  # battery capacity (what turns joules into battery percent)

    @classmethod
    def from_capabilities(cls, capabilities: Mapping[str, Any]) -> PowerModel | None:
        """The power model in a birth's capabilities; None if there is none; WireError if bad."""
        obj = capabilities.get("power")
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise WireError("malformed", "capabilities.power must be an object")
        what = "power model"
        return cls(
            compute_w=_number(obj, "compute_w", what, 0.0, 10_000.0),
            radio_w=_number(obj, "radio_w", what, 0.0, 10_000.0),
            battery_wh=_number(obj, "battery_wh", what, 1e-6, 1e6),
        )


def _only_keys(obj: Mapping[str, Any], known: frozenset[str], what: str) -> None:
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise WireError("malformed", f"{what}: unknown key {str(unknown[0])[:40]!r}")


TELEMETRY_KEYS = frozenset(
    {"v", "cpu_percent", "mem_available_mb", "samples", "battery_percent", "charging",
     "temperature_c", "link_kbps", "ts"}
)
STATUS_KEYS = frozenset(
    {"v", "state", "agent_version", "capabilities", "telemetry", "serving", "serving_accuracy",
     "serving_seq", "previous_accuracy", "ts"}
)


def _codec_names(obj: Mapping[str, Any], key: str, what: str) -> list[str]:
    names = obj[key]
    if not isinstance(names, list) or len(names) > MAX_CODECS:
        raise WireError("malformed", f"{what}: {key!r} must be a list of at most {MAX_CODECS}")
    return [_name({"codec": n}, "codec", what) for n in names]


# A birth's capabilities, key by key: what each must be. The registry keeps them and checkpoints
# them, so nothing else gets in (a number beyond 64 bits once stopped every checkpoint).
CAPABILITIES: dict[str, Any] = {
    "cpu_count": lambda o, k, w: _count(o, k, w, 1, 1 << 16),
    "mem_total_mb": lambda o, k, w: _count(o, k, w, 0, 1 << 40),
    "machine": lambda o, k, w: _text(o, k, w, 32, token=True),
    "python": lambda o, k, w: _text(o, k, w, 32, token=True),
    "samples": lambda o, k, w: _count(o, k, w, 0, MAX_SAMPLES),
    "model": lambda o, k, w: _name(o, k, w),
    "codecs": _codec_names,
    "power": lambda o, k, w: asdict(PowerModel.from_capabilities(o)),
    "simulated": lambda o, k, w: _flag(o, k, w, False),
    "charge_w": lambda o, k, w: _number(o, k, w, 0.0, 10_000.0),
    # false: a serve-only device (no torch), which the scheduler never asks to train
    "trains": lambda o, k, w: _flag(o, k, w, True),
}


def capabilities_from(obj: Any) -> dict[str, Any]:
    """A birth's capabilities, every key known and every value within its bounds."""
    what = "capabilities"
    if not isinstance(obj, dict):
        raise WireError("malformed", f"{what} must be an object")
    _only_keys(obj, frozenset(CAPABILITIES), what)
    return {key: CAPABILITIES[key](obj, key, what) for key in obj if obj[key] is not None}


REPLY_FORMAT = "edgefl.reply"
REPLY_KINDS = ("declined", "late", "superseded")
MAX_REASON = 200


def is_reply(payload: bytes) -> bool:
    """Replies are JSON objects; an update envelope is a MessagePack map, whose first byte is
    never ``{`` (0x7b would be a bare integer)."""
    return payload[:1] == b"{"


@dataclass
class Reply:
    """A device's answer to a task when it sends no update, on its update topic (JSON).

    ``declined``: it refused the work before starting (``reason`` says why: its battery, say);
    ``late``: it gave up at the task's deadline; ``superseded``: a newer task arrived while it
    worked. ``metrics`` hold what the work cost so far (cpu_s, train_s, samples_seen, and the
    battery level), so energy and speed are accounted for even when no update comes.
    """

    device_id: str
    round: int
    kind: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return _dump_json(
            {
                "fmt": REPLY_FORMAT,
                "v": FORMAT_VERSION,
                "device": self.device_id,
                "round": self.round,
                "kind": self.kind,
                "reason": self.reason[:MAX_REASON],
                "metrics": self.metrics,
                "ts": self.ts,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, *, topic_device_id: str) -> Reply:
        obj = _load_json(payload, "reply")
        _check_header(obj, REPLY_FORMAT)
        what = "reply"
        device_id = _name(obj, "device", what)
        if device_id != topic_device_id:
            raise WireError(
                "device_mismatch",
                f"reply says device {device_id!r}, topic says {topic_device_id!r}",
            )
        kind = obj.get("kind")
        if kind not in REPLY_KINDS:
            raise WireError("malformed", f"reply kind {str(kind)[:40]!r}")
        return cls(
            device_id=device_id,
            round=_count(obj, "round", what, 0, MAX_COUNT),
            kind=kind,
            reason=_text(obj, "reason", what, MAX_REASON),
            metrics=_metrics(obj.get("metrics", {}), what),
            ts=_number(obj, "ts", what, 0.0, MAX_TIME) if "ts" in obj else 0.0,
        )


_TASK_FIELDS = tuple(f.name for f in fields(Task))
