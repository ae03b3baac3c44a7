"""Every message edgefl puts on MQTT, typed, with the one place each is encoded and validated.

=================  ==========================================================================
module             what it holds
=================  ==========================================================================
``checks``         the format version and the one header check every decoder goes through;
                   size-capped readers of MessagePack and JSON; the field checks
``update``         the update envelope (device -> aggregator): compact, fields by position
``model``          the global model and the model delta (aggregator -> devices), MessagePack
``control``        task, telemetry, device status and capabilities (power model), aggregator
                   status, reply: JSON, so that ``mosquitto_sub`` shows them readably
``deployment``     the rollout manifest of an ONNX model (JSON)
``blob``           the manifest of a model, delta or update too large for one packet, sent in
                   chunks (JSON; edgefl/chunking.py)
=================  ==========================================================================

No decoder can run code: MessagePack extension types are refused and JSON has none. Everything
read from the wire goes through a ``decode_*``/``from_payload`` here and either comes out as a
valid object or raises :class:`~edgefl.compression.WireError` with a reason code; a message of
another format version is refused with the reason ``version``. The rest of edgefl handles only
valid objects.
"""

from edgefl.messages.blob import BLOB_FORMAT, BLOB_KINDS, BlobManifest, is_manifest
from edgefl.messages.checks import (
    FORMAT_VERSION,
    MAX_CONTROL_BYTES,
    MAX_COUNT,
    MAX_METRICS,
    MAX_SAMPLES,
    MAX_TIME,
    METRIC_RANGES,
    unpack,
)
from edgefl.messages.control import (
    CAPABILITIES,
    REPLY_FORMAT,
    REPLY_KINDS,
    AggregatorStatus,
    PowerModel,
    Reply,
    Status,
    Task,
    Telemetry,
    capabilities_from,
)
from edgefl.messages.deployment import MAX_ONNX_BYTES, VARIANTS, Deployment
from edgefl.messages.model import (
    MAX_MODEL_BYTES,
    MODEL_DELTA_FORMAT,
    MODEL_FORMAT,
    GlobalModel,
    ModelDelta,
    apply_delta,
    decode_model,
    decode_model_delta,
    encode_model,
    encode_model_delta,
    weights_digest,
)
from edgefl.messages.update import COMPACT_MAGIC, Update, decode_update, encode_compact_update

__all__ = [
    "BLOB_FORMAT",
    "BLOB_KINDS",
    "CAPABILITIES",
    "COMPACT_MAGIC",
    "FORMAT_VERSION",
    "MAX_CONTROL_BYTES",
    "MAX_COUNT",
    "MAX_METRICS",
    "MAX_MODEL_BYTES",
    "MAX_ONNX_BYTES",
    "MAX_SAMPLES",
    "MAX_TIME",
    "METRIC_RANGES",
    "MODEL_DELTA_FORMAT",
    "MODEL_FORMAT",
    "REPLY_FORMAT",
    "REPLY_KINDS",
    "VARIANTS",
    "AggregatorStatus",
    "BlobManifest",
    "Deployment",
    "GlobalModel",
    "ModelDelta",
    "PowerModel",
    "Reply",
    "Status",
    "Task",
    "Telemetry",
    "Update",
    "apply_delta",
    "capabilities_from",
    "decode_model",
    "decode_model_delta",
    "decode_update",
    "encode_compact_update",
    "encode_model",
    "encode_model_delta",
    "is_manifest",
    "unpack",
    "weights_digest",
]
