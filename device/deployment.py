"""The device's side of a rollout: follow the manifests, fetch the model, verify, serve, report.

Two retained manifests matter (see aggregator/deploy.py): ``model/onnx`` names what the fleet
serves; ``model/onnx/canary`` names a candidate and the canary devices that try it first. A
device serves the canary candidate if it is listed, else the fleet's model. When the canary
manifest is cleared the canaries go back to the fleet's model, which they still hold.

Fetching subscribes to the blob's chunk topics for as long as it takes; chunks are checked one
by one and the whole against its SHA-256 before it is written (atomically) and loaded. A device
that was offline during a rollout finds the retained manifest and chunks when it comes back.

No torch here: a device that only serves predictions needs ONNX Runtime alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from device.inference import InferenceServer, LocalModels
from edgefl.chunking import Assembler, chunk_filter
from edgefl.compression import WireError
from edgefl.messages import MAX_ONNX_BYTES, Deployment
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

log = logging.getLogger(__name__)


class DeploymentClient:
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        device_id: str,
        model: str,
        model_dir: str | Path,
        *,
        health: Callable[[InferenceServer], float | None] | None = None,
        on_change: Callable[[], None] | None = None,
        max_bytes: int = MAX_ONNX_BYTES,
        threads: int = 1,
    ) -> None:
        self.link = link
        self.topics = topics
        self.device_id = device_id
        self.model = model
        self.max_bytes = max_bytes
        self.store = LocalModels(model_dir)
        self.server = InferenceServer(threads)
        self._health = health
        self._on_change = on_change
        self._stable: Deployment | None = None
        self._canary: Deployment | None = None
        self._fetch: tuple[Deployment, Assembler, str] | None = None
        self.accuracy: float | None = None
        self.previous_accuracy: float | None = None
        self.rejected = 0
        current = self.store.current()
        if current is not None:
            self._load(current)
        link.subscribe(topics.model_onnx, self._on_stable)
        link.subscribe(topics.model_onnx_canary, self._on_canary)

    # -- what the device serves ---------------------------------------------------------------

    @property
    def serving_seq(self) -> int | None:
        seq = self.server.info.get("seq")
        return int(seq) if seq is not None else None

    def wanted(self) -> Deployment | None:
        canary = self._canary
        if canary is not None and self.device_id in canary.canaries:
            return canary
        return self._stable

    def _load(self, info: dict) -> bool:
        path = self.store.path(info["sha256"])
        if path is None:
            return False
        try:
            self.server.load(path, info)
        except Exception:
            log.exception("%s: could not load ONNX model %s", self.device_id, info["sha256"][:12])
            return False
        if self._health is not None:
            self.previous_accuracy, self.accuracy = self.accuracy, self._health(self.server)
        return True

    def _serve(self, dep: Deployment) -> None:
        info = {
            "sha256": dep.sha256,
            "version": dep.version,
            "seq": dep.seq,
            "variant": dep.variant,
            "metadata": dep.metadata,
        }
        if self.server.info.get("sha256") == dep.sha256:
            # the same file under a newer deployment (a promotion, a re-rollout): just relabel
            self.server.info = info
        elif not self._load(info):
            return
        self.store.set_current(info)
        log.info(
            "%s: serving ONNX model v%d (%s, deployment %d)",
            self.device_id,
            dep.version,
            dep.variant,
            dep.seq,
        )
        if self._on_change is not None:
            self._on_change()

    def _reconcile(self) -> None:
        want = self.wanted()
        if want is None:
            return
        info = self.server.info
        if info.get("sha256") == want.sha256 and info.get("seq") == want.seq:
            return
        if self.store.path(want.sha256) is not None:
            self._serve(want)
            return
        if self._fetch is not None:
            if self._fetch[0].sha256 == want.sha256:
                return  # already on its way
            self.link.unsubscribe(self._fetch[2])
        assembler = Assembler(want.blob, self.max_bytes)
        topic_filter = chunk_filter(self.topics.model_onnx, want.blob)
        self._fetch = (want, assembler, topic_filter)
        self.link.subscribe(topic_filter, self._on_chunk)

    # -- network thread ----------------------------------------------------------------------

    def _manifest(self, payload: bytes, kind: str) -> Deployment | None:
        try:
            return Deployment.from_payload(payload, model=self.model, max_bytes=self.max_bytes)
        except WireError as e:
            self.rejected += 1
            log.warning("%s: ignored %s manifest: %s", self.device_id, kind, e)
            return None

    def _on_stable(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return  # cleared: keep serving what we have
        dep = self._manifest(payload, "rollout")
        if dep is not None:
            self._stable = dep
            self._reconcile()

    def _on_canary(self, _topic: str, payload: bytes) -> None:
        self._canary = self._manifest(payload, "canary") if payload else None
        self._reconcile()

    def _on_chunk(self, _topic: str, payload: bytes) -> None:
        fetch = self._fetch
        if fetch is None or not payload:  # not fetching, or a retained chunk being cleared
            return
        dep, assembler, topic_filter = fetch
        try:
            whole = assembler.add(payload)
        except WireError as e:
            self.rejected += 1
            log.warning("%s: bad chunk of model v%d: %s", self.device_id, dep.version, e)
            return
        if whole is None:
            return
        self.link.unsubscribe(topic_filter)
        self._fetch = None
        self.store.add(dep.sha256, whole)
        self._reconcile()
