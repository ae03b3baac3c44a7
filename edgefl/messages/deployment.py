"""The rollout manifest (aggregator -> devices, JSON, retained): which ONNX model the fleet, or
its canaries, should serve. The ONNX file itself travels as a chunked blob (edgefl/chunking.py)
named by its SHA-256."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from edgefl.chunking import Blob
from edgefl.compression import WireError
from edgefl.messages import checks
from edgefl.messages.checks import FORMAT_VERSION

MAX_ONNX_BYTES = 64 << 20
VARIANTS = ("fp32", "int8")


@dataclass
class Deployment:
    """A rollout manifest, retained on model/onnx (what the fleet serves) or on
    model/onnx/canary (what the listed canary devices try first)."""

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
        return checks.dump_json({"v": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_payload(
        cls, payload: bytes, *, model: str, max_bytes: int = MAX_ONNX_BYTES
    ) -> Deployment:
        what = "deployment"
        obj = checks.read_json(payload, what)
        name = checks.get(obj, "model", str, what)
        if name != model:
            raise WireError("model", f"deployment is for {name[:64]!r}, this device runs {model!r}")
        variant = obj.get("variant")
        if variant not in VARIANTS:
            raise WireError("malformed", f"deployment variant {str(variant)[:20]!r}")
        meta = obj.get("metadata", {})
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise WireError("malformed", "deployment metadata must map strings to strings")
        dep = cls(
            version=checks.count(obj, "version", what),
            round=checks.count(obj, "round", what),
            model=name,
            variant=variant,
            sha256=checks.get(obj, "sha256", str, what),
            size=checks.count(obj, "size", what, 1, max_bytes),
            chunk_size=checks.count(obj, "chunk_size", what, 1, max_bytes),
            chunks=checks.count(obj, "chunks", what, 1),
            seq=checks.count(obj, "seq", what),
            metadata=meta,
            canaries=checks.device_ids(obj, "canaries", what),
            ts=checks.number(obj, "ts", what, 0.0) if "ts" in obj else 0.0,
        )
        dep.blob.check(max_bytes)
        return dep
