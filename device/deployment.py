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

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from device.inference import PERSONAL, InferenceServer, LocalModels
from edgefl.chunking import Assembler, chunk_filter
from edgefl.compression import WireError
from edgefl.messages import MAX_ONNX_BYTES, Deployment
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

log = logging.getLogger(__name__)

# the personal weights built on a deployment's global model version, or None: serve the fleet's
Personalise = Callable[[Deployment], dict[str, np.ndarray] | None]


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
        personalise: Personalise | None = None,
        check_inputs: np.ndarray | None = None,
    ) -> None:
        """``personalise``: serve the device's personal model (see the module's docstring);
        ``check_inputs``: rows its export is checked on (the device's local data; None: random
        inputs)."""
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
        self._personalise = personalise
        self._check_inputs = check_inputs
        # the network thread and the builder both put models in service
        self._serving = threading.RLock()
        self._builder = (
            ThreadPoolExecutor(1, thread_name_prefix=f"personal-{device_id}")
            if personalise is not None
            else None
        )
        self._asked: int | None = None  # the deployment (seq) the callback was last asked for
        self._asking = threading.Lock()  # guards _asked: held briefly, never during a build
        self._fallback_said = False  # why it serves the fleet's file: said once at info level
        self.personal_failures = 0  # personal models not served: callback, export or check
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

    @property
    def serving_variant(self) -> str | None:
        """``"fp32"``, ``"int8"`` (the fleet's file) or ``"personal"`` (this device's own,
        fp32), or None before the first model."""
        variant = self.server.info.get("variant")
        return str(variant) if variant is not None else None

    def refresh_personal(self) -> None:
        """Rebuild the personal model on the deployment in service: the personal state changed
        (a round of personal training) or personalisation was turned on. Any thread."""
        want = self.wanted()
        if self._personalise is not None and want is not None and self.store.path(want.sha256):
            self._queue_personal(want, again=True)

    def close(self) -> None:
        """Stop the builder (a build in progress finishes; none queued starts)."""
        if self._builder is not None:
            self._builder.shutdown(wait=False, cancel_futures=True)

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
        """Serve the fleet's file of ``dep``."""
        info = {
            "sha256": dep.sha256,
            "version": dep.version,
            "seq": dep.seq,
            "variant": dep.variant,
            "metadata": dep.metadata,
        }
        self._put_in_service(info, dep)

    def _put_in_service(self, info: dict, dep: Deployment) -> None:
        with self._serving:
            if self.server.info.get("sha256") == info["sha256"]:
                # the same file under a newer deployment (a promotion, a re-rollout): relabel
                self.server.info = info
            elif not self._load(info):
                return
            self.store.set_current(info)
        log.info(
            "%s: serving ONNX model v%d (%s, deployment %d)",
            self.device_id,
            dep.version,
            info["variant"],
            dep.seq,
        )
        if self._on_change is not None:
            self._on_change()

    def _serves(self, want: Deployment) -> bool:
        """Whether what is in service is what ``want`` asks for: its file, or this device's
        personal model built on it once the callback has been asked."""
        info = self.server.info
        if info.get("seq") != want.seq:
            return False
        if info.get("variant") == PERSONAL:
            return self._personalise is not None and info.get("base_sha256") == want.sha256
        return info.get("sha256") == want.sha256 and (
            self._personalise is None or self._asked == want.seq
        )

    def _reconcile(self) -> None:
        want = self.wanted()
        if want is None:
            return
        if self._serves(want):
            return
        if self.store.path(want.sha256) is not None:
            if self._personalise is None:
                self._serve(want)
            else:
                self._queue_personal(want)
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

    # -- the personal model (builder thread) ------------------------------------------------------

    def _queue_personal(self, dep: Deployment, again: bool = False) -> None:
        with self._asking:
            if self._asked == dep.seq and not again:
                return  # asked already: built, or fell back, or failed (refresh_personal retries)
            self._asked = dep.seq
        try:
            self._builder.submit(self._build_personal, dep)
        except RuntimeError:  # closed: the device is stopping
            pass

    def _still_wanted(self, dep: Deployment) -> bool:
        want = self.wanted()
        return want is not None and want.seq == dep.seq and want.sha256 == dep.sha256

    def _build_personal(self, dep: Deployment) -> None:
        if not self._still_wanted(dep):
            return  # a newer deployment came: its own build is queued
        try:
            weights = self._personalise(dep)
            if weights is not None:
                from device.personal.serving import build_personal_onnx

                body = build_personal_onnx(
                    self.model, weights, self._check_inputs, metadata=self._personal_metadata(dep)
                )
        except Exception as e:  # noqa: BLE001 - whatever went wrong, this model is not served
            self._not_served(dep, e)
            return
        if weights is None:
            self._serve_fleet_file(dep, f"no personal model on v{dep.version}")
            return
        sha256 = hashlib.sha256(body).hexdigest()
        self.store.add(sha256, body)
        info = {
            "sha256": sha256,
            "version": dep.version,
            "seq": dep.seq,
            "variant": PERSONAL,
            "precision": "fp32",
            "base_sha256": dep.sha256,
            "base_variant": dep.variant,
            "metadata": self._personal_metadata(dep),
        }
        with self._serving:
            if self._still_wanted(dep):
                self._fallback_said = False
                self._put_in_service(info, dep)

    @staticmethod
    def _personal_metadata(dep: Deployment) -> dict[str, str]:
        # the fleet's metadata, less its accuracy (the global model's, not this one's)
        meta = {k: v for k, v in dep.metadata.items() if k != "accuracy"}
        return meta | {"variant": PERSONAL, "precision": "fp32", "base_sha256": dep.sha256}

    def _serve_fleet_file(self, dep: Deployment, why: str) -> None:
        say = log.debug if self._fallback_said else log.info
        self._fallback_said = True
        say("%s: serves the fleet's model v%d: %s", self.device_id, dep.version, why)
        with self._serving:
            if self._still_wanted(dep):
                self._serve(dep)

    def _not_served(self, dep: Deployment, error: Exception) -> None:
        from device.personal.serving import PersonalModelError

        self.personal_failures += 1
        (log.warning if isinstance(error, PersonalModelError) else log.exception)(
            "%s: personal model on v%d not served: %s",
            self.device_id,
            dep.version,
            error,
        )
        if not self.server.ready:  # nothing in service yet: the fleet's checked file, not none
            self._serve_fleet_file(dep, "its personal model failed")
