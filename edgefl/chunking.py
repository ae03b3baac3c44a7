"""Payloads larger than one MQTT packet: split into chunks, reassembled with a checksum.

Managed brokers cap a message at 128-256 KB and Mosquitto refuses packets over its
``max_packet_size``; an ONNX model can be larger. A large payload (a *blob*) is therefore named
by its SHA-256 and published as numbered chunks, each retained on its own topic
(``{base}/blob/{id}/{i}``), so a device that connects later still finds every chunk. A small
manifest elsewhere says which blob to fetch, its size and how it was cut.

The receiving side trusts nothing: each chunk is checked against the manifest (blob id, index,
count, exact length) before it is kept, memory is bounded by the manifest's size, and the whole
is accepted only if its SHA-256 matches.

One mechanism for everything that can outgrow a packet: ONNX rollouts (aggregator/deploy.py),
the global model and its deltas (aggregator/broadcast.py, device/model_sync.py) and dense
updates (device/updates.py, aggregator/reassembly.py). A sender splits a payload only when it
would not fit the broker's packet limit (:func:`fits`), so a model and updates that fit travel
as one message, exactly as they did before chunking existed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from edgefl.compression import WireError

CHUNK_FORMAT = "edgefl.chunk"
FORMAT_VERSION = 1
MAX_CHUNKS = 4096
ID_LEN = 16  # hex digits of the SHA-256 that name a blob in topics
CHUNK_OVERHEAD = 128  # room for the chunk's own fields within a packet
# room for the topic and the MQTT headers around a payload (a PUBLISH adds 1 + 4 + 2 + 2 + 1 bytes
# to its topic; edgefl's topics stay under 200 bytes)
PACKET_OVERHEAD = 512
MIN_CHUNK = 1024


class Publisher(Protocol):
    """What publishing chunks needs of a connection (edgefl.mqtt.MqttLink)."""

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, on_acked: Any = None
    ) -> Any: ...


@dataclass(frozen=True)
class Blob:
    """What a manifest says about a blob: enough to fetch and verify it."""

    sha256: str
    size: int
    chunk_size: int
    count: int

    @property
    def id(self) -> str:
        return self.sha256[:ID_LEN]

    def check(self, max_size: int) -> None:
        """Refuse a manifest that is inconsistent or asks for more memory than allowed."""
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise WireError("malformed", "blob sha256 must be 64 lowercase hex digits")
        if not 0 < self.size <= max_size:
            raise WireError("too_large", f"blob of {self.size} bytes, the limit is {max_size}")
        if self.chunk_size < 1 or not 0 < self.count <= MAX_CHUNKS:
            raise WireError("malformed", f"blob cut into {self.count} chunks of {self.chunk_size}")
        if self.count != math.ceil(self.size / self.chunk_size):
            raise WireError(
                "malformed",
                f"{self.size} bytes in chunks of {self.chunk_size} are not {self.count} chunks",
            )


def chunk_filter(base: str, blob: Blob) -> str:
    """Subscription filter for every chunk of ``blob``."""
    return f"{base}/blob/{blob.id}/+"


def chunk_topic(base: str, blob: Blob, index: int) -> str:
    return f"{base}/blob/{blob.id}/{index}"


def fits(payload_bytes: int, limit: int | None) -> bool:
    """Whether a payload of ``payload_bytes`` travels as one MQTT packet under the broker's
    ``limit`` (None: no limit known)."""
    return limit is None or payload_bytes + PACKET_OVERHEAD <= limit


def chunk_size_for(limit: int | None, preferred: int | None = None) -> int:
    """The largest chunk whose packet fits ``limit``, at most ``preferred``, at least
    MIN_CHUNK."""
    size = preferred if preferred is not None else 1 << 30
    if limit:  # leave room for the topic, the MQTT header and the chunk's own fields
        size = min(size, limit - CHUNK_OVERHEAD - PACKET_OVERHEAD)
    return max(MIN_CHUNK, size)


def publish_chunks(
    link: Publisher,
    base: str,
    blob: Blob,
    chunks: list[bytes],
    *,
    retain: bool,
    on_acked: Callable[[float], None] | None = None,
) -> list[Any]:
    """Publish the chunks :func:`split` made of ``blob`` under ``base`` (QoS 1), in order; each
    one's publish handle. ``on_acked`` goes with the last chunk (edgefl.mqtt.MqttLink.publish)."""
    last = len(chunks) - 1
    return [
        link.publish(chunk_topic(base, blob, i), c, qos=1, retain=retain,
                     on_acked=on_acked if i == last else None)
        for i, c in enumerate(chunks)
    ]


def clear_chunks(link: Publisher, base: str, blob: Blob) -> None:
    """Delete the retained chunks of ``blob`` (an empty retained message clears a topic)."""
    for i in range(blob.count):
        link.publish(chunk_topic(base, blob, i), b"", qos=1, retain=True)


def split(payload: bytes, chunk_size: int) -> tuple[Blob, list[bytes]]:
    """The blob descriptor and the chunk messages for ``payload``."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    digest = hashlib.sha256(payload).hexdigest()
    count = max(1, math.ceil(len(payload) / chunk_size))
    if count > MAX_CHUNKS:
        raise ValueError(
            f"{len(payload)} bytes need more than {MAX_CHUNKS} chunks; raise chunk_size"
        )
    blob = Blob(digest, len(payload), chunk_size, count)
    chunks = [
        msgpack.packb(
            {
                "fmt": CHUNK_FORMAT,
                "v": FORMAT_VERSION,
                "id": blob.id,
                "i": i,
                "n": count,
                "data": payload[i * chunk_size : (i + 1) * chunk_size],
            },
            use_bin_type=True,
        )
        for i in range(count)
    ]
    return blob, chunks


class Assembler:
    """Collects the chunks of one blob; ``add`` returns the payload once it is whole."""

    def __init__(self, blob: Blob, max_size: int) -> None:
        blob.check(max_size)
        self.blob = blob
        self._parts: dict[int, bytes] = {}

    @property
    def missing(self) -> int:
        return self.blob.count - len(self._parts)

    def add(self, payload: bytes, index: int | None = None, strict: bool = False) -> bytes | None:
        """Keep one chunk; the whole payload once every chunk is in, else None. ``index`` is
        the chunk's number as its topic gives it, which its own must match. A chunk of another
        blob is ignored (a retained chunk of an older rollout), or refused when ``strict``."""
        b = self.blob
        if (
            not isinstance(payload, (bytes, bytearray))
            or len(payload) > b.chunk_size + CHUNK_OVERHEAD
        ):
            raise WireError("too_large", "chunk larger than the manifest allows")
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_no_ext)
        except WireError:
            raise
        except Exception as e:
            raise WireError("malformed", f"chunk is not MessagePack ({type(e).__name__})") from None
        if not isinstance(obj, dict) or obj.get("fmt") != CHUNK_FORMAT:
            raise WireError("malformed", "not an edgefl chunk")
        if type(obj.get("v")) is not int or obj["v"] != FORMAT_VERSION:
            raise WireError("version", f"chunk format version {obj.get('v')!r}")
        if obj.get("id") != b.id:
            if strict:
                raise WireError("malformed", "chunk of another blob than its topic names")
            return None  # a chunk of another blob (an older rollout); not ours to judge
        i, n, data = obj.get("i"), obj.get("n"), obj.get("data")
        if type(i) is not int or type(n) is not int or not isinstance(data, bytes):
            raise WireError("malformed", "chunk fields have the wrong types")
        if index is not None and i != index:
            raise WireError("malformed", f"chunk {i} on the topic of chunk {index}")
        if n != b.count or not 0 <= i < n:
            raise WireError("malformed", f"chunk {i} of {n}; the manifest says {b.count} chunks")
        expected = b.chunk_size if i < n - 1 else b.size - b.chunk_size * (n - 1)
        if len(data) != expected:
            raise WireError("size", f"chunk {i} holds {len(data)} bytes, {expected} expected")
        self._parts[i] = data
        if len(self._parts) < n:
            return None
        whole = b"".join(self._parts[k] for k in range(n))
        if hashlib.sha256(whole).hexdigest() != b.sha256:
            self._parts.clear()
            raise WireError("checksum", "SHA-256 of the reassembled blob does not match")
        return whole


def _no_ext(code: int, data: bytes) -> object:
    raise WireError("malformed", f"MessagePack extension type {code} is not allowed")
