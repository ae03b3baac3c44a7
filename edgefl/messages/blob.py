"""The manifest of a message too large for one MQTT packet (JSON): it goes on the topic the
message would have taken and names the blob (edgefl/chunking.py) whose chunks carry it, on
``{topic}/blob/{id}/{i}``.

Three kinds: the global model on model/global (retained, its chunks retained), a model delta on
model/delta (its chunks retained), and a device's update on devices/{id}/update (its chunks
not retained: the aggregator's persistent session queues them). The receiver checks the
manifest, collects the chunks with an :class:`~edgefl.chunking.Assembler` and decodes the whole,
once its SHA-256 matched, exactly as it decodes the message sent in one piece.

A manifest is told apart from the message itself by its first byte: JSON objects start with
``{``, which no MessagePack map (a model) and no compact update (tag 0xC1) does.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefl.chunking import Blob
from edgefl.compression import WireError
from edgefl.messages import checks
from edgefl.messages.checks import FORMAT_VERSION

BLOB_FORMAT = "edgefl.blob"
BLOB_KINDS = ("model", "model_delta", "update")
_KEYS = frozenset(
    {"fmt", "v", "kind", "version", "round", "sha256", "size", "chunk_size", "chunks"}
)


def is_manifest(payload: bytes) -> bool:
    """Whether ``payload`` is a manifest rather than the message itself (never raises)."""
    return payload[:1] == b"{"


@dataclass(frozen=True)
class BlobManifest:
    """What a receiver needs to fetch and check a chunked message, and to skip it early."""

    kind: str  # one of BLOB_KINDS
    # model: its version; model_delta: the version it leads to; update: the version it builds on
    version: int
    round: int  # the round the model closed, or the update is for
    blob: Blob

    def to_payload(self) -> bytes:
        b = self.blob
        return checks.dump_json(
            {
                "fmt": BLOB_FORMAT,
                "v": FORMAT_VERSION,
                "kind": self.kind,
                "version": self.version,
                "round": self.round,
                "sha256": b.sha256,
                "size": b.size,
                "chunk_size": b.chunk_size,
                "chunks": b.count,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, *, kind: str, max_bytes: int) -> BlobManifest:
        """The manifest of a ``kind`` message of at most ``max_bytes``; WireError otherwise
        (``too_large`` for a larger one)."""
        what = f"{kind} manifest"
        obj = checks.read_json(payload, what, BLOB_FORMAT)
        checks.only_keys(obj, _KEYS, what)
        if obj.get("kind") != kind:
            raise WireError("malformed", f"{what} says kind {str(obj.get('kind'))[:20]!r}")
        blob = Blob(
            sha256=checks.get(obj, "sha256", str, what),
            size=checks.count(obj, "size", what),
            chunk_size=checks.count(obj, "chunk_size", what),
            count=checks.count(obj, "chunks", what),
        )
        blob.check(max_bytes)
        return cls(kind, checks.count(obj, "version", what), checks.count(obj, "round", what), blob)
