"""Exporting the global model to ONNX and rolling it out to the fleet.

Export: the model goes into the versioned store (aggregator/store.py) as fp32 ONNX, checked
against PyTorch on held-out data, and as an int8 variant made with ONNX Runtime's quantisation.

Rollout: the chosen file travels as a chunked blob (edgefl/chunking.py), each chunk retained,
then a small manifest names it:

- ``model/onnx`` (retained) is what the fleet serves;
- ``model/onnx/canary`` (retained while a canary runs) names a candidate and the devices that
  try it first. The candidate is promoted when every canary serves it and none lost more than
  ``canary_margin`` of accuracy on its own data compared with the model it served before;
  otherwise the canary manifest is cleared and the canaries go back to the fleet's model.

Nothing reaches the fleet unchecked: an fp32 export whose logits differ from PyTorch's by more
than ``deploy.parity_tolerance`` is refused (logged, recorded, never published), and so is its
int8 variant, which is judged by its held-out accuracy against fp32 instead (``int8_margin``):
quantisation moves its logits by far more than any fp32 tolerance. The fleet keeps serving the
model it has.

Devices report the deployment they serve in their status; that is how a rollout knows it has
landed. A device that was offline gets the retained manifest and chunks when it comes back.
A rollback is a rollout of an older entry of the store, with a new deployment number.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from aggregator.registry import DeviceRecord, DeviceRegistry
from aggregator.store import ModelStore, sha256_file
from edgefl.chunking import Blob, chunk_size_for, clear_chunks, publish_chunks, split
from edgefl.compression import WireError
from edgefl.config import AggregatorConfig, BrokerConfig, DeployConfig
from edgefl.data import Dataset
from edgefl.messages import Deployment, Status
from edgefl.models import ModelInfo
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

log = logging.getLogger(__name__)


def export(
    model: nn.Module,
    info: ModelInfo,
    store: ModelStore,
    *,
    version: int,
    round_: int,
    accuracy: float | None,
    eval_data: Dataset | None,
    int8: bool = True,
    calibration_samples: int = DeployConfig.calibration_samples,
) -> dict[str, Any]:
    """Export ``model`` into the store as fp32 (and int8) ONNX and check it against PyTorch.

    A model with convolutions is quantised statically (aggregator/onnx_export.py), calibrated
    on ``calibration_samples`` rows of ``eval_data``; without held-out data it gets no int8
    variant (the entry's ``skipped`` says why, and a rollout of it is refused): calibrating on
    made-up inputs would set every activation's range wrong, with no accuracy to catch it.
    """
    from aggregator.onnx_export import (
        export_onnx,
        onnx_logits,
        parity,
        quantisation_method,
        quantize_int8,
    )

    metadata = {
        "edgefl_model": info.name,
        "model_version": version,
        "round": round_,
        "input_shape": json.dumps(list(info.input_shape)),
        "labels": json.dumps(list(range(info.num_classes))),
        "accuracy": "" if accuracy is None else f"{accuracy:.6f}",
    }
    fp32 = export_onnx(model, store.file(version, "fp32"), info.input_shape, metadata)
    check_X = (
        eval_data.X
        if eval_data is not None
        # no held-out data: random inputs still catch a broken export
        else np.random.default_rng(0).random((256, *info.input_shape), dtype=np.float32)
    )
    entry: dict[str, Any] = {
        "version": version,
        "round": round_,
        "metadata": {k: str(v) for k, v in metadata.items()},
        "parity_max_abs": parity(fp32, model, check_X),
        "variants": {"fp32": {"bytes": fp32.stat().st_size, "sha256": sha256_file(fp32)}},
    }
    method = quantisation_method(fp32) if int8 else None
    calibration = (
        calibration_sample(eval_data.X, calibration_samples)
        if method == "static" and eval_data is not None
        else None
    )
    if method == "static" and calibration is None:
        entry["skipped"] = {
            "int8": "a convolutional model is quantised statically, which needs calibration "
            "data: the aggregator's eval_data"
        }
        log.warning("no int8 variant of model v%d: %s", version, entry["skipped"]["int8"])
    elif method is not None:
        q = quantize_int8(fp32, store.file(version, "int8"), calibration)
        entry["variants"]["int8"] = {
            "bytes": q.stat().st_size,
            "sha256": sha256_file(q),
            "quantisation": method,
            # for the record only (tenths to units by design, most where an activation
            # leaves its calibrated range); int8 is judged by accuracy
            "parity_max_abs": parity(q, model, check_X),
        }
        if method == "static":
            entry["variants"]["int8"]["calibration_samples"] = len(calibration)
    if eval_data is not None:
        for variant in entry["variants"]:
            logits = onnx_logits(store.file(version, variant), eval_data.X)
            entry["variants"][variant]["accuracy"] = float((logits.argmax(1) == eval_data.y).mean())
    store.save_info(version, entry)
    log.info(
        "exported model v%d: fp32 %d bytes (parity with PyTorch %.2g)%s",
        version,
        entry["variants"]["fp32"]["bytes"],
        entry["parity_max_abs"],
        f", int8 {entry['variants']['int8']['bytes']} bytes" if "int8" in entry["variants"] else "",
    )
    # the figures the command line and the demo report
    entry["path"] = str(fp32)
    entry["bytes"] = entry["variants"]["fp32"]["bytes"]
    return entry


def calibration_sample(X: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """``samples`` rows of ``X`` (all if it has fewer) for calibrating a static int8
    quantisation: a seeded random pick, in the original order, because held-out files are often
    sorted (by class, by subject) and their first rows would cover a few classes only."""
    if samples < 1:
        raise ValueError(f"calibration needs at least one sample, not {samples}")
    if len(X) <= samples:
        return X
    rows = np.sort(np.random.default_rng(seed).choice(len(X), samples, replace=False))
    return X[rows]


def refusal(entry: dict[str, Any], variant: str, cfg: DeployConfig) -> str | None:
    """Why ``variant`` of the exported model ``entry`` must not go to the fleet; None if it may."""
    skipped = entry.get("skipped", {}).get(variant)
    if skipped:
        return f"it has no {variant} variant: {skipped}"
    parity = entry.get("parity_max_abs")
    # "not <=" so that NaN, what a broken graph often yields, is refused too; an entry without
    # the figure predates the check and was served before
    if parity is not None and not parity <= cfg.parity_tolerance:
        return (
            f"its ONNX export differs from PyTorch by up to {parity:.3g} on the check data "
            f"(deploy.parity_tolerance = {cfg.parity_tolerance:g})"
        )
    if variant == "int8":
        variants = entry.get("variants", {})
        fp32 = variants.get("fp32", {}).get("accuracy")
        int8 = variants.get("int8", {}).get("accuracy")
        # without held-out data there is no accuracy to judge by; the fp32 parity above is
        # then the only check, and a canary the way to catch a quantisation that hurts
        if fp32 is not None and int8 is not None and not fp32 - int8 <= cfg.int8_margin:
            return (
                f"int8 accuracy {int8:.4f} is {fp32 - int8:.4f} below fp32's {fp32:.4f} "
                f"(deploy.int8_margin = {cfg.int8_margin:g})"
            )
    return None


def _serving(seq: int, devices: list[str] | None = None):
    """Predicate over the registry: the given devices (default: all online) serve ``seq``."""

    def check(records: list[DeviceRecord]) -> bool:
        pool = [r for r in records if r.online and (devices is None or r.device_id in devices)]
        return bool(pool) and all(r.serving_seq == seq for r in pool)

    return check


class Rollout:
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        registry: DeviceRegistry,
        model_name: str,
        store: ModelStore,
        cfg: DeployConfig,
    ) -> None:
        self.link = link
        self.topics = topics
        self.registry = registry
        self.model_name = model_name
        self.store = store
        self.cfg = cfg

    def _chunk_size(self) -> int:
        # chunk_bytes, or less if the broker takes less (``[broker] max_packet_bytes``, CONNACK)
        return chunk_size_for(self.link.packet_limit, self.cfg.chunk_bytes)

    def _upload(self, body: bytes) -> Blob:
        blob, chunks = split(body, self._chunk_size())
        base = self.topics.model_onnx
        for info in publish_chunks(self.link, base, blob, chunks, retain=True):
            info.wait_for_publish(timeout=30)
        return blob

    def _clear_old_blobs(self, keep: set[str]) -> None:
        """Delete the retained chunks of models no manifest names any more."""
        cleared = set()
        for d in self.store.deployments():
            blob = d.get("blob")
            if not blob or blob["sha256"] in keep or blob["sha256"] in cleared:
                continue
            clear_chunks(self.link, self.topics.model_onnx, Blob(**blob))
            cleared.add(blob["sha256"])

    def publish(
        self,
        version: int,
        variant: str | None = None,
        *,
        canary_fraction: float | None = None,
        kind: str = "rollout",
    ) -> dict[str, Any]:
        """Roll model ``version`` out (through canaries if configured); returns the figures.

        A model that fails its export checks (:func:`refusal`) is not published at all; the
        result then has ``promoted: False`` and ``refused``, the reason."""
        variant = variant or self.cfg.variant
        entry = self.store.info(version)
        path = self.store.file(version, variant)
        # a variant the export skipped on purpose is refused (and recorded) below, not missing
        skipped = entry is not None and variant in entry.get("skipped", {})
        if entry is None or not (path.exists() or skipped):
            raise FileNotFoundError(f"model v{version} ({variant}) is not in {self.store.root}")
        why = refusal(entry, variant, self.cfg)
        if why is not None:
            current = self.store.current()
            log.error(
                "refused to roll out model v%d (%s): %s; the fleet keeps serving %s",
                version,
                variant,
                why,
                f"v{current['version']} ({current['variant']})" if current else "no model",
            )
            # recorded without a seq or blob: it never reached the broker, and a rollback
            # (store.previous) only considers promoted entries
            refused = {
                "kind": kind,
                "version": version,
                "variant": variant,
                "promoted": False,
                "refused": why,
            }
            self.store.record(refused)
            return refused
        fraction = self.cfg.canary_fraction if canary_fraction is None else canary_fraction
        started = time.perf_counter()
        blob = self._upload(path.read_bytes())

        def manifest(seq: int, canaries: list[str]) -> Deployment:
            return Deployment(
                version=version,
                round=int(entry.get("round", 0)),
                model=self.model_name,
                variant=variant,
                sha256=blob.sha256,
                size=blob.size,
                chunk_size=blob.chunk_size,
                chunks=blob.count,
                seq=seq,
                metadata=entry.get("metadata", {}),
                canaries=canaries,
            )

        result: dict[str, Any] = {
            "kind": kind,
            "version": version,
            "variant": variant,
            "bytes": blob.size,
            "chunks": blob.count,
            "sha256": blob.sha256,
        }
        online = [r.device_id for r in self.registry.online()]
        if fraction > 0 and len(online) > 1:
            canaries = sorted(online)[: max(1, math.ceil(fraction * len(online)))]
            verdict = self._canary(manifest(self.store.next_seq(), canaries), canaries)
            result["canary"] = verdict
            self.store.record(
                {
                    "seq": verdict["seq"],
                    "version": version,
                    "variant": variant,
                    "kind": "canary",
                    "promoted": False,
                    "blob": vars(blob),
                    "canaries": canaries,
                    "healthy": verdict["healthy"],
                }
            )
            if not verdict["healthy"]:
                log.warning(
                    "canary of model v%d failed: %s; not promoted", version, verdict["reason"]
                )
                result.update(promoted=False, rollout_s=time.perf_counter() - started)
                return result

        seq = self.store.next_seq()
        self.link.publish(
            self.topics.model_onnx, manifest(seq, []).to_payload(), qos=1, retain=True
        ).wait_for_publish(timeout=10)
        # the canaries now read the same model under the fleet's manifest; end the canary
        self.link.publish(self.topics.model_onnx_canary, b"", qos=1, retain=True)
        done = self.registry.wait_for(_serving(seq), self.cfg.rollout_timeout_s)
        took = time.perf_counter() - started
        online_now = self.registry.online()
        serving = [r for r in online_now if r.serving_seq == seq]
        accs = [r.serving_accuracy for r in serving if r.serving_accuracy is not None]
        self.store.record(
            {
                "seq": seq,
                "version": version,
                "variant": variant,
                "kind": kind,
                "promoted": True,
                "blob": vars(blob),
            }
        )
        self._clear_old_blobs(keep={blob.sha256})
        if done:
            log.info(
                "model v%d (%s) served by all %d online devices %.3f s after publishing",
                version,
                variant,
                len(online_now),
                took,
            )
        else:
            log.warning(
                "model v%d served by %d of %d online devices after %.0f s",
                version,
                len(serving),
                len(online_now),
                self.cfg.rollout_timeout_s,
            )
        result.update(
            promoted=True,
            seq=seq,
            devices_online=len(online_now),
            devices_serving=len(serving),
            rollout_s=took,
            device_accuracy_mean=float(np.mean(accs)) if accs else None,
        )
        return result

    def _canary(self, dep: Deployment, canaries: list[str]) -> dict[str, Any]:
        self.link.publish(
            self.topics.model_onnx_canary, dep.to_payload(), qos=1, retain=True
        ).wait_for_publish(timeout=10)
        loaded = self.registry.wait_for(_serving(dep.seq, canaries), self.cfg.canary_timeout_s)
        records = {r.device_id: r for r in self.registry.online() if r.device_id in canaries}
        drops = {
            d: r.previous_accuracy - r.serving_accuracy
            for d, r in records.items()
            if r.serving_seq == dep.seq
            and r.previous_accuracy is not None
            and r.serving_accuracy is not None
        }
        worst = max(drops.values(), default=0.0)
        healthy = loaded and worst <= self.cfg.canary_margin
        reason = (
            ""
            if healthy
            else f"not every canary serves it after {self.cfg.canary_timeout_s:.0f} s"
            if not loaded
            else f"local accuracy fell by {worst:.3f} (margin {self.cfg.canary_margin})"
        )
        if not healthy:
            # end the canary: the canaries go back to the fleet's model
            self.link.publish(self.topics.model_onnx_canary, b"", qos=1, retain=True)
        return {
            "seq": dep.seq,
            "devices": canaries,
            "healthy": healthy,
            "reason": reason,
            "worst_accuracy_drop": worst,
        }

    def rollback(self, to_version: int | None = None, variant: str | None = None) -> dict:
        """Serve an earlier model again: the previous one by default."""
        if to_version is None:
            prev = self.store.previous()
            if prev is None:
                raise RuntimeError("no earlier rollout to go back to")
            to_version, variant = prev["version"], variant or prev["variant"]
        return self.publish(to_version, variant, canary_fraction=0.0, kind="rollback")


def store_for(state_dir: str | Path) -> ModelStore:
    return ModelStore(Path(state_dir) / "models")


def follow_statuses(link: MqttLink, topics: Topics, registry: DeviceRegistry) -> None:
    """Feed the devices' retained statuses into ``registry`` (for a rollout run on its own)."""

    def on_status(topic: str, payload: bytes) -> None:
        parsed = topics.parse_device_topic(topic)
        if parsed is None or not payload:
            return
        try:
            registry.on_status(parsed[0], Status.from_payload(payload))
        except WireError as e:
            log.warning("ignored status from %s: %s", parsed[0], e)

    link.subscribe(topics.all_devices("status"), on_status)


def rollback_command(
    cfg: AggregatorConfig,
    admin: BrokerConfig,
    to_version: int | None,
    variant: str | None,
    settle_s: float = 1.0,
) -> dict[str, Any]:
    """``edgefl rollback``: serve an earlier model from the aggregator's store. It connects with
    ``admin``, the operators' account: under the aggregator's own it would take over the running
    aggregator's connection and persistent session (the broker names a connection by its
    account)."""
    registry = DeviceRegistry()
    topics = Topics(cfg.fleet)
    link = MqttLink("edgefl-rollback", admin, clean_start=True)
    follow_statuses(link, topics, registry)
    with link:
        # the retained statuses arrive right after subscribing; give them a moment
        registry.wait_for(lambda _r: False, settle_s)
        rollout = Rollout(
            link, topics, registry, cfg.model.name, store_for(cfg.state_dir), cfg.deploy
        )
        return rollout.rollback(to_version, variant)
