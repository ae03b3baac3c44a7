"""Keeping the device's copy of the global model in step with the aggregator's.

Full models arrive retained on model/global (QoS 1). When the aggregator's downlink is
``delta`` (aggregator/broadcast.py), its full models say so (``deltas``): a device that holds
one leaves model/global and follows model/delta, where each version arrives as the change from
the one before, a fraction of the full model's size. It goes back to model/global, which always
holds the current model in full, whenever it cannot follow:

- a delta does not start from the version it holds: it missed one (it was away longer than its
  broker session keeps messages, or it restarted);
- the model a delta leads to does not have the SHA-256 the delta names, so training on it would
  build on weights the aggregator does not have;
- a task names a version it does not hold, and no delta brought it within ``wait_s``.

A delta older than the model held, or for the model held (a QoS 1 redelivery), is ignored.

A model or delta larger than the broker's packet limit comes as a manifest in its place
(edgefl.messages.BlobManifest; aggregator/broadcast.py): the device subscribes to the blob's
retained chunks, checks each one and the whole against its SHA-256 (edgefl/chunking.py), and
decodes the whole exactly as the message sent in one piece. A manifest of the version it holds
(a retained manifest comes again on every subscription) is not fetched again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from edgefl.chunking import Assembler, chunk_filter
from edgefl.compression import ModelSpec, WireError
from edgefl.messages import (
    MAX_MODEL_BYTES,
    BlobManifest,
    GlobalModel,
    apply_delta,
    decode_model,
    decode_model_delta,
    is_manifest,
    weights_digest,
)
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class _Fetch:
    """A chunked model or delta on its way: its manifest, its chunks so far, what takes it."""

    manifest: BlobManifest
    assembler: Assembler
    topic_filter: str
    then: Callable[[bytes], None]


class ModelSync:
    """Subscribes the agent to the model topics and hands it each model it should hold.

    ``held()`` returns the model the agent holds; ``adopt(model)`` gives it a new one;
    ``reject(reason)`` counts a message that was refused.
    """

    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        spec: ModelSpec,
        model_name: str,
        device_id: str,
        *,
        held: Callable[[], GlobalModel | None],
        adopt: Callable[[GlobalModel], None],
        reject: Callable[[str], None],
        wait_s: float = 2.0,
    ) -> None:
        self.link = link
        self.topics = topics
        self.spec = dict(spec)
        self.model_name = model_name
        self.id = device_id
        self._held = held
        self._adopt = adopt
        self._reject = reject
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self.reading_full = False
        self.full_fetches = 0  # times it went back to model/global for a full model
        self.deltas_applied = 0
        self._fetches: dict[str, _Fetch] = {}  # base topic -> the chunked message on its way
        link.subscribe(topics.model_delta, self._on_delta)
        self.fetch_full()

    def fetch_full(self) -> None:
        """Read model/global: the broker sends the retained model at once."""
        with self._lock:
            if self.reading_full:
                return
            self.reading_full = True
            self.full_fetches += 1
        self.link.subscribe(self.topics.model_global, self._on_full)

    def _leave_full(self) -> None:
        with self._lock:
            if not self.reading_full:
                return
            self.reading_full = False
        self.link.unsubscribe(self.topics.model_global)

    def want(self, version: int) -> None:
        """A task builds on ``version``, which the device does not hold: give a delta a moment
        to bring it, then fetch the full model."""
        if self.reading_full:
            return
        timer = threading.Timer(self.wait_s, self._check_wanted, args=(version,))
        timer.daemon = True
        timer.start()

    def _check_wanted(self, version: int) -> None:
        held = self._held()
        if held is None or held.version != version:
            log.info(
                "%s: model v%d did not come as a delta; fetching the full model", self.id, version
            )
            self.fetch_full()

    # -- network thread -----------------------------------------------------------------------

    def _on_full(self, _topic: str, payload: bytes) -> None:
        if is_manifest(payload):
            self._fetch(self.topics.model_global, "model", payload, self._full)
        else:
            self._full(payload)

    def _on_delta(self, _topic: str, payload: bytes) -> None:
        if is_manifest(payload):
            self._fetch(self.topics.model_delta, "model_delta", payload, self._delta)
        else:
            self._delta(payload)

    # -- chunked models and deltas ----------------------------------------------------------------

    def _fetch(
        self, base: str, kind: str, payload: bytes, then: Callable[[bytes], None]
    ) -> None:
        """Follow a manifest: fetch the chunks of the blob it names, unless it brings nothing
        new."""
        try:
            manifest = BlobManifest.from_payload(payload, kind=kind, max_bytes=MAX_MODEL_BYTES)
        except WireError as e:
            self._reject(e.reason)
            log.warning("%s: ignored %s manifest: %s", self.id, kind, e)
            return
        held = self._held()
        if kind == "model" and held is not None and held.version == manifest.version:
            if held.deltas:  # as the full model itself would have said
                self._leave_full()
            return
        if kind == "model_delta" and (held is None or manifest.version <= held.version):
            return  # the full model is on its way; or old news, as for a delta sent whole
        topic_filter = chunk_filter(base, manifest.blob)
        with self._lock:
            old = self._fetches.get(base)
            if old is not None and old.manifest.blob == manifest.blob:
                return  # already on its way
            self._fetches[base] = _Fetch(
                manifest, Assembler(manifest.blob, MAX_MODEL_BYTES), topic_filter, then
            )
        if old is not None:
            self.link.unsubscribe(old.topic_filter)
        self.link.subscribe(topic_filter, lambda _t, p: self._on_chunk(base, p))

    def _on_chunk(self, base: str, payload: bytes) -> None:
        with self._lock:
            fetch = self._fetches.get(base)
        if fetch is None or not payload:  # not fetching, or a retained chunk being cleared
            return
        try:
            whole = fetch.assembler.add(payload)
        except WireError as e:
            self._reject(e.reason)
            log.warning("%s: bad chunk of %s v%d: %s", self.id, fetch.manifest.kind,
                        fetch.manifest.version, e)
            self._end_fetch(base, fetch)
            if base == self.topics.model_delta:
                self.fetch_full()
            return
        if whole is not None and self._end_fetch(base, fetch):
            fetch.then(whole)

    def _end_fetch(self, base: str, fetch: _Fetch) -> bool:
        """Stop fetching ``fetch``; False if another fetch replaced it meanwhile."""
        with self._lock:
            if self._fetches.get(base) is not fetch:
                return False
            del self._fetches[base]
        self.link.unsubscribe(fetch.topic_filter)
        return True

    # -- whole models and deltas --------------------------------------------------------------

    def _full(self, payload: bytes) -> None:
        try:
            msg = decode_model(payload, spec=self.spec, model=self.model_name)
        except WireError as e:
            self._reject(e.reason)
            log.warning("%s: ignored global model: %s", self.id, e)
            return
        self._adopt(msg)
        if msg.deltas:
            self._leave_full()

    def _delta(self, payload: bytes) -> None:
        try:
            delta = decode_model_delta(payload, spec=self.spec, model=self.model_name)
        except WireError as e:
            self._reject(e.reason)
            log.warning("%s: ignored model delta: %s", self.id, e)
            return
        held = self._held()
        if held is None:
            return  # the full model is on its way (it is fetched at start)
        if delta.version <= held.version:
            return  # old news, or a redelivery of what we applied
        if delta.base != held.version:
            log.info(
                "%s: delta v%d->v%d does not apply to v%d; fetching the full model",
                self.id,
                delta.base,
                delta.version,
                held.version,
            )
            self.fetch_full()
            return
        weights = apply_delta(held.weights, delta.delta)
        if weights_digest(weights, self.spec) != delta.target_sha256:
            self._reject("delta_mismatch")
            log.warning(
                "%s: model v%d from a delta differs from the aggregator's; fetching it in full",
                self.id,
                delta.version,
            )
            self.fetch_full()
            return
        self.deltas_applied += 1
        self._adopt(
            GlobalModel(
                delta.version, delta.round, self.model_name, weights, delta.target_sha256, True
            )
        )
