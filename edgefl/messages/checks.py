"""What every decoder shares: the one header check, the readers of untrusted bytes, and the
field checks.

Every message carries the format version :data:`FORMAT_VERSION`: JSON and MessagePack messages
as ``"v"`` (with ``"fmt"`` where one topic could carry another kind of message), the update
envelope in its second byte. :func:`check_version` is the one place it is compared, so an old
device or aggregator is refused the same way everywhere, with the reason ``version``.

The checks take the field's container, its key and ``what`` (the message, for the reason's
text) and return the value or raise :class:`~edgefl.compression.WireError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import msgpack

from edgefl.compression import WireError
from edgefl.config import NAME_RE

# 2: the update envelope is the compact one alone, and every message's version is checked
FORMAT_VERSION = 2
MAX_CONTROL_BYTES = 64 * 1024
MAX_METRICS = 32
# bounds for what devices say about themselves: everything the aggregator keeps (its registry,
# checkpoints, metrics) stays within what JSON, MessagePack and the scheduler's arithmetic hold
MAX_COUNT = 2**53
MAX_SAMPLES = 10**9
MAX_TIME = 1e11  # unix seconds: the year 5138

# printable ASCII without spaces: agent versions, machine names
TOKEN_RE = re.compile(r"^[!-~]*\Z")


# ---------------------------------------------------------------------------------------------
# the header


def check_version(version: Any, what: str) -> None:
    """The one version check of every message, whatever its encoding."""
    if type(version) is not int or version != FORMAT_VERSION:  # not True, not 2.0
        raise WireError(
            "version",
            f"{what} of format version {str(version)[:20]}, this build reads {FORMAT_VERSION}",
        )


def check_header(obj: Mapping[str, Any], what: str, fmt: str | None = None) -> None:
    """``fmt`` (when the message has one) and the format version of a decoded map."""
    if fmt is not None and obj.get("fmt") != fmt:
        raise WireError("malformed", f"not an {fmt} message (fmt={str(obj.get('fmt'))[:40]!r})")
    check_version(obj.get("v"), what)


# ---------------------------------------------------------------------------------------------
# untrusted bytes to objects


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError("malformed", f"MessagePack extension type {code} is not allowed")


def _refuse_timestamp(container: Any) -> Any:
    # msgpack decodes extension type -1 (Timestamp) itself, without calling ext_hook
    items = container.values() if isinstance(container, dict) else container
    if any(isinstance(x, msgpack.Timestamp) for x in items):
        raise WireError("malformed", "MessagePack extension type -1 is not allowed")
    return container


def unpack_any(payload: bytes, max_bytes: int) -> Any:
    """Any MessagePack value from untrusted bytes: size-capped, no extension types, string
    keys."""
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
    """A MessagePack map from untrusted bytes (see :func:`unpack_any`)."""
    obj = unpack_any(payload, max_bytes)
    if not isinstance(obj, dict):
        raise WireError("malformed", "payload is not a MessagePack map")
    return obj


def read_msgpack(payload: bytes, what: str, fmt: str, max_bytes: int) -> dict[str, Any]:
    """A MessagePack message: a map whose header is checked."""
    obj = unpack(payload, max_bytes)
    check_header(obj, what, fmt)
    return obj


def read_json(payload: bytes, what: str, fmt: str | None = None) -> dict[str, Any]:
    """A JSON control message: an object of at most MAX_CONTROL_BYTES whose header is checked."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise WireError("too_large", f"{what} of {len(payload)} bytes")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
        raise WireError("malformed", f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise WireError("malformed", f"{what} is not a JSON object")
    check_header(obj, what, fmt)
    return obj


def dump_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------------------------------------
# fields


def get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in d:
        raise WireError("malformed", f"{what} has no {key!r}")
    value = d[key]
    # bool is an int in Python; on the wire a flag is never a count
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise WireError("malformed", f"{what}: {key!r} must be a number, got {value!r}")
    if not isinstance(value, kind):
        raise WireError("malformed", f"{what}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def count(d: Mapping[str, Any], key: str, what: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    value = get(d, key, int, what)
    if not lo <= value <= hi:
        raise WireError("malformed", f"{what}: {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def optional_count(
    d: Mapping[str, Any], key: str, what: str, lo: int = 0, hi: int = MAX_COUNT
) -> int | None:
    """A count that may be absent or null (None then)."""
    return None if d.get(key) is None else count(d, key, what, lo, hi)


def number(
    d: Mapping[str, Any], key: str, what: str, lo: float = -math.inf, hi: float = math.inf
) -> float:
    try:
        value = float(get(d, key, (int, float), what))
    except OverflowError:  # a JSON integer too large for a float
        value = math.inf
    if not math.isfinite(value) or not lo <= value <= hi:
        raise WireError("malformed", f"{what}: {key!r} = {value} is not finite or out of range")
    return value


def optional_number(
    d: Mapping[str, Any], key: str, what: str, lo: float, hi: float
) -> float | None:
    """A number that may be absent or null (None then)."""
    return None if d.get(key) is None else number(d, key, what, lo, hi)


def name(d: Mapping[str, Any], key: str, what: str) -> str:
    """A device, fleet, model or codec name (config.NAME_RE: safe in a topic and a path)."""
    value = get(d, key, str, what)
    if not NAME_RE.match(value):
        raise WireError("malformed", f"{what}: {key!r} = {value[:80]!r} is not a valid name")
    return value


def device_ids(obj: Mapping[str, Any], key: str, what: str) -> list[str]:
    ids = obj.get(key, [])
    if not isinstance(ids, list) or not all(isinstance(i, str) and NAME_RE.match(i) for i in ids):
        raise WireError("malformed", f"{what}: {key!r} must be a list of device ids")
    return ids


def text(d: Mapping[str, Any], key: str, what: str, max_len: int, token: bool = False) -> str:
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


def flag(d: Mapping[str, Any], key: str, what: str, default: bool | None) -> bool | None:
    value = d.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise WireError("malformed", f"{what}: {key!r} must be true or false")
    return value


def only_keys(obj: Mapping[str, Any], known: frozenset[str], what: str) -> None:
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise WireError("malformed", f"{what}: unknown key {str(unknown[0])[:40]!r}")


def codec_spec(spec: Any) -> dict[str, Any]:
    """The codec spec as a map, once make_codec has accepted it (it also takes a bare name)."""
    return {"name": spec} if isinstance(spec, str) else dict(spec)


# ---------------------------------------------------------------------------------------------
# training metrics (in updates and replies)

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
    "personal_acc": (0.0, 1.0),
    "global_acc": (0.0, 1.0),
    "holdout_samples": (0.0, float(MAX_SAMPLES)),
}
OTHER_METRIC_LIMIT = 1e30


def check_metric_ranges(metrics: Mapping[str, float], what: str) -> dict[str, float]:
    for k, v in metrics.items():
        lo, hi = METRIC_RANGES.get(k, (-OTHER_METRIC_LIMIT, OTHER_METRIC_LIMIT))
        if not lo <= v <= hi:
            raise WireError(
                "malformed", f"{what}: metric {k[:64]!r} = {v:g} is outside [{lo:g}, {hi:g}]"
            )
    return dict(metrics)


def metrics(value: Any, what: str) -> dict[str, float]:
    """A map of at most MAX_METRICS named finite numbers, each within its range."""
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
    return check_metric_ranges(out, what)
