"""How much the broker lets one client push: derived from the fleet's model, not guessed.

The largest message a fleet legitimately sends is a dense fp32 update or global model (4 bytes a
parameter plus the envelope) or a chunk of an ONNX rollout (``deploy.chunk_bytes``), whichever is
larger. The packet limit is that with a quarter to spare: anything bigger is junk, and Mosquitto
disconnects its sender. The queue limits hold a round of dense updates from a fleet of
``fleet_devices`` with room to spare, so honest traffic always fits while a flood cannot take the
broker's memory with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefl.chunking import CHUNK_OVERHEAD
from edgefl.config import ConfigError, DeployConfig
from edgefl.models import model_info

# the envelope around a dense model or update: tensor names, shapes, version, SHA-256, metrics
ENVELOPE_BYTES = 2048
# the topic and MQTT headers around a payload
PACKET_OVERHEAD = 512
MARGIN = 1.25
MIN_QUEUE_BYTES = 64 << 20


@dataclass(frozen=True)
class BrokerLimits:
    max_packet_size: int  # bytes in one MQTT packet
    max_queued_bytes: int  # bytes queued (and, separately, in flight) for one client


def limits_for_params(
    params: int, chunk_bytes: int = DeployConfig.chunk_bytes, fleet_devices: int = 1000
) -> BrokerLimits:
    """The limits for a model of ``params`` float32 parameters."""
    dense = 4 * params + ENVELOPE_BYTES
    largest = max(dense, chunk_bytes + CHUNK_OVERHEAD) + PACKET_OVERHEAD
    packet = -(-int(largest * MARGIN) // 4096) * 4096  # rounded up to 4 KiB
    queue = max(MIN_QUEUE_BYTES, -(-fleet_devices * dense // (1 << 20)) << 20)
    return BrokerLimits(packet, queue)


def limits_for_model(
    model: str, chunk_bytes: int = DeployConfig.chunk_bytes, fleet_devices: int = 1000
) -> BrokerLimits:
    """The limits for the fleet's model (by name, as in the ``[model]`` table); ConfigError for
    a name edgefl does not know."""
    try:
        info = model_info(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return limits_for_params(info.parameters, chunk_bytes, fleet_devices)


DEFAULT_LIMITS = limits_for_model("mlp_digits")
