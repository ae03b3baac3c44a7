"""How much the broker lets one client push: derived from the fleet's model, not guessed.

The largest message a fleet legitimately sends is a dense fp32 update or global model (4 bytes a
parameter plus the envelope) or a chunk of an ONNX rollout (``deploy.chunk_bytes``), whichever is
larger. The packet limit is that with a quarter to spare: anything bigger is junk, and Mosquitto
disconnects its sender. A deployment may cap it lower (``max_packet_bytes``: ``edgefl broker
--max-packet-bytes``, ``[demo] max_packet_bytes``), as managed brokers cap messages at
128-256 KB: Mosquitto tells every MQTT 5 client the limit in its CONNACK, and edgefl's senders
split whatever would not fit into chunks (edgefl/chunking.py). The queue limits hold a round of
dense updates from a fleet of ``fleet_devices`` with room to spare, so honest traffic always fits
while a flood cannot take the broker's memory with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefl.chunking import CHUNK_OVERHEAD, MIN_CHUNK, PACKET_OVERHEAD
from edgefl.config import ConfigError, DeployConfig
from edgefl.models import model_info

# the envelope around a dense model or update: tensor names, shapes, version, SHA-256, metrics
ENVELOPE_BYTES = 2048
MARGIN = 1.25
MIN_QUEUE_BYTES = 64 << 20


@dataclass(frozen=True)
class BrokerLimits:
    max_packet_size: int  # bytes in one MQTT packet
    max_queued_bytes: int  # bytes queued (and, separately, in flight) for one client


# the smallest packet limit edgefl works under: a chunk of MIN_CHUNK bytes must fit
MIN_PACKET_BYTES = MIN_CHUNK + CHUNK_OVERHEAD + PACKET_OVERHEAD


def limits_for_params(
    params: int,
    chunk_bytes: int = DeployConfig.chunk_bytes,
    fleet_devices: int = 1000,
    max_packet_bytes: int = 0,
) -> BrokerLimits:
    """The limits for a model of ``params`` float32 parameters; ``max_packet_bytes`` > 0 caps
    the packet limit (larger models and updates then travel in chunks)."""
    if max_packet_bytes and max_packet_bytes < MIN_PACKET_BYTES:
        raise ConfigError(
            f"a packet limit of {max_packet_bytes} bytes is too small: edgefl needs at least "
            f"{MIN_PACKET_BYTES}"
        )
    dense = 4 * params + ENVELOPE_BYTES
    largest = max(dense, chunk_bytes + CHUNK_OVERHEAD) + PACKET_OVERHEAD
    packet = -(-int(largest * MARGIN) // 4096) * 4096  # rounded up to 4 KiB
    if max_packet_bytes:
        packet = min(packet, max_packet_bytes)
    queue = max(MIN_QUEUE_BYTES, -(-fleet_devices * dense // (1 << 20)) << 20)
    return BrokerLimits(packet, queue)


def limits_for_model(
    model: str,
    chunk_bytes: int = DeployConfig.chunk_bytes,
    fleet_devices: int = 1000,
    max_packet_bytes: int = 0,
) -> BrokerLimits:
    """The limits for the fleet's model (by name, as in the ``[model]`` table); ConfigError for
    a name edgefl does not know."""
    try:
        info = model_info(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return limits_for_params(info.parameters, chunk_bytes, fleet_devices, max_packet_bytes)


DEFAULT_LIMITS = limits_for_model("mlp_digits")
