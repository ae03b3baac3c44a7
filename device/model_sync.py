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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edgefl.compression import ModelSpec, WireError
from edgefl.messages import (
    GlobalModel,
    apply_delta,
    decode_model,
    decode_model_delta,
    weights_digest,
)
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

log = logging.getLogger(__name__)


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
        try:
            msg = decode_model(payload, spec=self.spec, model=self.model_name)
        except WireError as e:
            self._reject(e.reason)
            log.warning("%s: ignored global model: %s", self.id, e)
            return
        self._adopt(msg)
        if msg.deltas:
            self._leave_full()

    def _on_delta(self, _topic: str, payload: bytes) -> None:
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
