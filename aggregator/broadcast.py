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

``bytes_per_device`` is what one device downloads to get the current version: the delta in
delta mode (the full model for the first version), the full payload otherwise. A device that
falls back to the full model also downloads that, which the aggregator cannot see.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

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


class ModelBroadcast:
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        model_name: str,
        spec: ModelSpec | None = None,
        codec: CodecConfig | None = None,
    ) -> None:
        cfg = codec or CodecConfig()
        if cfg.downlink not in DOWNLINKS:
            raise ConfigError(
                f"codec.downlink {cfg.downlink!r} is not one of {', '.join(DOWNLINKS)}"
            )
        self.link = link
        self.topics = topics
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
        self.link.publish(self.topics.model_global, full, qos=1, retain=True)
        send_delta = delta is not None and self._delta_sent != version
        if send_delta:
            assert delta is not None
            self.link.publish(self.topics.model_delta, delta, qos=1)
            self._delta_sent = version
            log.debug("model v%d: delta of %d bytes, full %d bytes", version, len(delta), len(full))
        if self._held is None or self._held[0] != version:
            self.bytes_per_device = len(delta) if send_delta and delta is not None else len(full)
        self._held = (version, held)
