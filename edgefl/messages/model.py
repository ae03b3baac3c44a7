"""The model messages (aggregator -> devices): the global model, retained on model/global, and
the delta from one version to the next on model/delta. Both are MessagePack maps."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from edgefl.compression import Codec, ModelSpec, WireError, make_codec
from edgefl.messages import checks
from edgefl.messages.checks import FORMAT_VERSION

MODEL_FORMAT = "edgefl.model"
MODEL_DELTA_FORMAT = "edgefl.model_delta"
# the largest model or delta message a device accepts, in one piece or in chunks
MAX_MODEL_BYTES = 64 << 20


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


def decode_model(
    payload: bytes, *, spec: ModelSpec, model: str, max_bytes: int = MAX_MODEL_BYTES
) -> GlobalModel:
    """The global model from its retained message, its SHA-256 verified."""
    what = "global model"
    obj = checks.read_msgpack(payload, what, MODEL_FORMAT, max_bytes)
    version = checks.count(obj, "version", what)
    rnd = checks.count(obj, "round", what)
    name = checks.get(obj, "model", str, what)
    if name != model:
        raise WireError("model", f"global model is {name[:64]!r}, this device runs {model!r}")
    body = checks.get(obj, "body", bytes, what)
    digest = checks.get(obj, "sha256", str, what)
    if hashlib.sha256(body).hexdigest() != digest:
        raise WireError("checksum", "SHA-256 of the model body does not match")
    deltas = obj.get("deltas", False)
    if not isinstance(deltas, bool):
        raise WireError("malformed", f"{what}: 'deltas' must be true or false")
    codec = make_codec(obj.get("codec"), complete=True)
    records = checks.unpack_any(body, max_bytes)
    if not isinstance(records, (list, bytes)):  # records, or one packed payload
        raise WireError("malformed", "model body is not a list of tensors")
    weights = codec.decode(records, spec)
    return GlobalModel(version, rnd, name, weights, digest, deltas)


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
    payload: bytes, *, spec: ModelSpec, model: str, max_bytes: int = MAX_MODEL_BYTES
) -> ModelDelta:
    what = "model delta"
    obj = checks.read_msgpack(payload, what, MODEL_DELTA_FORMAT, max_bytes)
    version = checks.count(obj, "version", what)
    base = checks.count(obj, "base", what)
    if version <= base:
        raise WireError("malformed", f"{what} from v{base} to v{version}")
    name = checks.get(obj, "model", str, what)
    if name != model:
        raise WireError("model", f"model delta is for {name[:64]!r}, this device runs {model!r}")
    target = checks.get(obj, "target", str, what)
    if len(target) != 64 or any(c not in "0123456789abcdef" for c in target):
        raise WireError("malformed", f"{what}: 'target' is not a SHA-256 in hex")
    codec_spec = obj.get("codec")
    codec = make_codec(codec_spec, complete=True)
    delta = codec.decode(obj.get("body"), spec)
    return ModelDelta(
        version,
        base,
        checks.count(obj, "round", what),
        name,
        delta,
        target,
        checks.codec_spec(codec_spec),
    )
