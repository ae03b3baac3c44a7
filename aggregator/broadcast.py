"""Publishing the global model to the fleet, at full precision or compressed (``[codec] downlink``).

- ``fp32``: every value, retained on model/global (QoS 1): each device downloads the whole model
  every round.
- ``fp16``, ``int8``: the model at half precision, or as 8-bit levels with per-block scales
  (stochastic rounding), retained on model/global.
- ``delta``: the change since the version devices hold, on model/delta (QoS 1, not retained),
  packed like a pruned update (only the positions that changed, ``downlink_bits`` per value,
  ``downlink_block`` values per scale). The full model at fp32 stays retained on model/global,
  flagged ``deltas``: a device that connects, restarts or misses a delta reads it there, and a
  device that holds a model leaves model/global and follows model/delta
  (device/model_sync.py).

Aggregator and devices never diverge, because the aggregator's model *is* the one devices
reconstruct: :meth:`ModelBroadcast.prepare` encodes the server optimiser's result and returns
the weights as every device will decode them (for a delta: the held model plus the decoded
delta, through :func:`edgefl.messages.apply_delta`, the very function devices call), and the
service adopts those as its model, evaluates, checkpoints and trains on them. What the lossy
encoding left out is not lost: it is added to the next version's target (error feedback on the
server side, as in DoubleSqueeze: Tang, Yu, Lian, Zhang and Liu, ICML 2019; it is kept in memory
only, so a restarted aggregator starts without it). Each delta names
the SHA-256 of the model it leads to, so a device that arrives anywhere else finds out and
fetches the full model. A model that was not prepared (the first publish, one resumed from a
checkpoint) goes out at fp32, exactly as the aggregator holds it.

A model or delta larger than the broker's packet limit (``link.packet_limit``: ``[broker]
max_packet_bytes`` or the broker's CONNACK) travels as a chunked blob (edgefl/chunking.py): its
chunks retained on ``{topic}/blob/{id}/{i}``, then a small manifest (edgefl.messages.BlobManifest)
on model/global (retained) or model/delta in its place. Devices fetch, verify and decode it
exactly as the message sent whole (device/model_sync.py); one that connects later finds the
retained manifest and chunks. The chunks of the version before are cleared once the next one is
out; which blobs are retained is kept in the state directory (``retained-blobs.json``), so that a
restarted aggregator clears what an earlier one left. What fits goes as one message, as before.

``bytes_per_device`` is what one device downloads to get the current version: the delta in
delta mode (the full model for the first version), the full payload otherwise (its manifest and
chunks when chunked). A device that falls back to the full model also downloads that, which the
aggregator cannot see.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edgefl.atomic import write_atomic
from edgefl.chunking import Blob, chunk_size_for, clear_chunks, fits, publish_chunks, split
from edgefl.compression import (
    DenseCodec,
    DenseFp16Codec,
    Int8Codec,
    ModelSpec,
    PruneCodec,
    flatten,
    unflatten,
)
from edgefl.config import CodecConfig, ConfigError
from edgefl.messages import (
    BlobManifest,
    GlobalModel,
    ModelDelta,
    apply_delta,
    encode_model,
    encode_model_delta,
    weights_digest,
)
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

log = logging.getLogger(__name__)

DOWNLINKS = ("fp32", "fp16", "int8", "delta")
BLOBS_FILE = "retained-blobs.json"


class RetainedBlobs:
    """Sends a message whole when it fits the broker's packet limit, else as retained chunks and
    a manifest; and clears the chunks no manifest names any more, this process's or an earlier
    one's (listed in ``path``)."""

    def __init__(self, link: MqttLink, path: Path | None) -> None:
        self.link = link
        self.path = path
        self._held: dict[str, list[Blob]] = {}  # topic -> blobs whose chunks are retained
        # the round loop publishes, and so does the network thread after a reconnect
        self._lock = threading.Lock()
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
                self._held = {t: [Blob(**b) for b in bs] for t, bs in saved.items()}
            except (OSError, ValueError, TypeError, AttributeError) as e:
                log.warning("ignoring %s (%s): chunks it listed stay on the broker", path, e)

    def send(
        self,
        topic: str,
        payload: bytes,
        manifest: Callable[[Blob], BlobManifest],
        *,
        retain: bool,
    ) -> int:
        """Publish ``payload`` on ``topic`` (QoS 1), whole or chunked; the bytes a receiver
        downloads for it."""
        with self._lock:
            return self._send(topic, payload, manifest, retain)

    def _send(
        self, topic: str, payload: bytes, manifest: Callable[[Blob], BlobManifest], retain: bool
    ) -> int:
        limit = self.link.packet_limit
        if fits(len(payload), limit):
            self.link.publish(topic, payload, qos=1, retain=retain)
            self._clear(topic, keep=None)
            return len(payload)
        blob, chunks = split(payload, chunk_size_for(limit))
        if blob not in self._held.get(topic, []):
            # remembered before it reaches the broker, so that no crash can leave it there unlisted
            self._save({**self._held, topic: [*self._held.get(topic, []), blob]})
        # in order on one connection: the chunks are retained before the manifest is delivered
        publish_chunks(self.link, topic, blob, chunks, retain=True)
        note = manifest(blob).to_payload()
        self.link.publish(topic, note, qos=1, retain=retain)
        self._clear(topic, keep=blob)
        return len(note) + sum(len(c) for c in chunks)

    def _clear(self, topic: str, keep: Blob | None) -> None:
        """Clear the retained chunks under ``topic`` of every blob but ``keep``. A device still
        fetching one of them reads the newer manifest next (model/global is retained; a
        device that misses a delta fetches the full model)."""
        held = self._held.get(topic, [])
        old = [b for b in held if b != keep]
        if not old:
            return
        for blob in old:
            clear_chunks(self.link, topic, blob)
        # the file is rewritten with the next chunked message; until then listing the cleared
        # ones costs nothing but clearing them again
        self._held[topic] = [keep] if keep is not None else []

    def _save(self, held: dict[str, list[Blob]]) -> None:
        self._held = held
        if self.path is not None:
            data = {t: [vars(b) for b in bs] for t, bs in held.items() if bs}
            write_atomic(self.path, json.dumps(data))


class ModelBroadcast:
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        model_name: str,
        spec: ModelSpec | None = None,
        codec: CodecConfig | None = None,
        *,
        state_dir: str | Path | None = None,
    ) -> None:
        cfg = codec or CodecConfig()
        if cfg.downlink not in DOWNLINKS:
            raise ConfigError(
                f"codec.downlink {cfg.downlink!r} is not one of {', '.join(DOWNLINKS)}"
            )
        self.link = link
        self.topics = topics
        self.blobs = RetainedBlobs(link, Path(state_dir) / BLOBS_FILE if state_dir else None)
        self.model_name = model_name
        self.spec = dict(spec) if spec is not None else None
        self.mode = cfg.downlink
        try:
            self.delta_codec = PruneCodec(
                threshold=0.0, bits=cfg.downlink_bits, block=cfg.downlink_block
            )
            int8 = Int8Codec(block=cfg.downlink_block)
        except ValueError as e:
            raise ConfigError(f"[codec] downlink: {e}") from None
        self.full_codec = {
            "fp32": DenseCodec(),
            "fp16": DenseFp16Codec(),
            "int8": int8,
            "delta": DenseCodec(),
        }[self.mode]
        # what one device downloads to get the current model (for the byte accounting)
        self.bytes_per_device = 0
        self._rng = np.random.default_rng(0)
        self._residual: np.ndarray | None = None  # what lossy encoding left out, for next time
        self._held: tuple[int, dict[str, np.ndarray]] | None = None  # last published (version, P)
        # prepared, not yet published: (version, weights, full payload, delta payload or None)
        self._prepared: tuple[int, dict[str, np.ndarray], bytes, bytes | None] | None = None
        self._delta_sent: int | None = None

    # -- encoding ---------------------------------------------------------------------------------

    def prepare(
        self, weights: Mapping[str, np.ndarray], version: int, round_: int
    ) -> dict[str, np.ndarray]:
        """Encode ``weights`` as model ``version``; returns the weights as devices will decode
        them, which the caller must adopt as its model. :meth:`publish` sends it."""
        spec = self._spec(weights)
        target = flatten(weights, spec)
        if self._residual is not None:
            target = target + self._residual
        delta_payload = None
        if self.mode == "fp32":
            held = {k: np.asarray(weights[k], dtype=np.float32).copy() for k in spec}
            full = encode_model(
                GlobalModel(version, round_, self.model_name, held), self.full_codec
            )
        elif self.mode == "fp16":
            held = unflatten(target.astype(np.float16).astype(np.float32), spec)
            full = encode_model(
                GlobalModel(version, round_, self.model_name, held), self.full_codec
            )
        elif self.mode == "int8":
            data, _, sent = self.full_codec.compress(target, spec, self._rng)
            held = unflatten(sent, spec)
            msg = GlobalModel(version, round_, self.model_name, held)
            full = encode_model(msg, self.full_codec, data)
        elif self._held is None:  # delta mode, but devices hold nothing we know of
            held = unflatten(target, spec)
            full = self._full_fp32(held, version, round_)
        else:
            base_version, base = self._held
            data, idx, sent = self.delta_codec.compress(
                target - flatten(base, spec), spec, self._rng
            )
            change = np.zeros(len(target), dtype=np.float32)
            change[idx] = sent
            held = apply_delta(base, unflatten(change, spec))
            msg = ModelDelta(
                version, base_version, round_, self.model_name, {}, weights_digest(held, spec)
            )
            delta_payload = encode_model_delta(msg, self.delta_codec, data)
            full = self._full_fp32(held, version, round_)
        residual = target - flatten(held, spec)
        self._residual = residual if residual.any() else None
        self._prepared = (version, held, full, delta_payload)
        return {k: v.copy() for k, v in held.items()}

    def _full_fp32(self, weights: dict[str, np.ndarray], version: int, round_: int) -> bytes:
        deltas = self.mode == "delta"
        msg = GlobalModel(version, round_, self.model_name, weights, deltas=deltas)
        return encode_model(msg, DenseCodec())

    def _spec(self, weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        if self.spec is None:
            self.spec = {k: tuple(np.shape(v)) for k, v in weights.items()}
        return self.spec

    # -- publishing -------------------------------------------------------------------------------

    def publish(self, weights: Mapping[str, np.ndarray], version: int, round_: int) -> None:
        """Make model ``version`` current: the prepared payloads if :meth:`prepare` made them
        (the delta only once: a republish after a reconnect sends the retained model alone),
        else ``weights`` at fp32, as they are."""
        prepared = self._prepared
        if prepared is not None and prepared[0] == version:
            _, held, full, delta = prepared
        else:
            spec = self._spec(weights)
            held = {k: np.asarray(weights[k], dtype=np.float32).copy() for k in spec}
            full, delta = self._full_fp32(held, version, round_), None
            self._prepared = (version, held, full, None)
            self._residual = None
        full_bytes = self.blobs.send(
            self.topics.model_global,
            full,
            lambda blob: BlobManifest("model", version, round_, blob),
            retain=True,
        )
        send_delta = delta is not None and self._delta_sent != version
        delta_bytes = 0
        if send_delta:
            assert delta is not None
            delta_bytes = self.blobs.send(
                self.topics.model_delta,
                delta,
                lambda blob: BlobManifest("model_delta", version, round_, blob),
                retain=False,
            )
            self._delta_sent = version
            log.debug("model v%d: delta of %d bytes, full %d bytes", version, len(delta), len(full))
        if self._held is None or self._held[0] != version:
            self.bytes_per_device = delta_bytes if send_delta else full_bytes
        self._held = (version, held)
