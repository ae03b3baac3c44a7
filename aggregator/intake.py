"""Everything devices send, from MQTT payload to the registry or the open round.

One forward path per kind of message, run in the network thread:

- status and telemetry: admitted by the guard (aggregator/guard.py), checked against the
  enrolled list, decoded and validated (edgefl/messages/), then kept by the registry;
- an update: admitted, enrolled, decoded against the model and the open round, held to
  ``limits.max_delta_abs``, folded into the round's accumulator exactly once
  (aggregator/rounds.py), and its acknowledgement held until the round's checkpoint is on the
  disk; so is that of a redelivered copy of an update whose original is still held (a dropped
  connection makes the broker send it again); anything else is acknowledged at once;
- an update larger than the broker's packet limit comes as a manifest on the update topic and
  chunks on devices/{id}/update/blob/{blob}/{i}: the manifest is checked against the open round,
  the chunks are put back together per device (aggregator/reassembly.py), and the whole takes
  the path above; the acknowledgements of the manifest and of every chunk are held with it;
- a reply (a device that sends no update: declined, late, superseded), on its own topic:
  admitted, enrolled, decoded, handed to the round lifecycle, which may ask another device to
  step in.

Every refusal has a reason, is counted by kind and reason, and reaches the guard, which logs it
(rate-limited) and quarantines a device that floods or keeps sending invalid messages.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from aggregator.enrolled import EnrolledDevices
from aggregator.guard import Guard
from aggregator.reassembly import PartialUpdates
from aggregator.registry import DeviceRegistry
from aggregator.rounds import Duplicate, Hold, NotParticipant, Sink
from edgefl.compression import ModelSpec, WireError
from edgefl.config import AggregatorConfig
from edgefl.messages import BlobManifest, Reply, Status, Telemetry, decode_update, is_manifest
from edgefl.topics import Topics

log = logging.getLogger(__name__)

T = TypeVar("T")


class Intake:
    def __init__(
        self,
        cfg: AggregatorConfig,
        spec: ModelSpec,
        registry: DeviceRegistry,
        *,
        current_round: Callable[[], Sink | None],
        on_reply: Callable[[Sink, Reply], None],
        on_quarantine: Callable[[str, str], None],
        on_change: Callable[[], None],
    ) -> None:
        """``current_round`` gives the open sink, a round or the asynchronous buffer (or None);
        ``on_reply`` takes a reply that withdrew a participant from it; ``on_quarantine`` cuts
        a device off at the broker; ``on_change`` is told when a device went offline or an
        update was accepted."""
        self.cfg = cfg
        self.spec = spec
        self.registry = registry
        self.topics = Topics(cfg.fleet)
        self._current_round = current_round
        self._on_reply = on_reply
        self._on_change = on_change
        self.enrolled = EnrolledDevices(cfg.enrolled_devices)
        self.guard = Guard(cfg.quarantine, on_quarantine)
        self.rejected: Counter[str] = Counter()  # updates and replies, by reason
        # updates that come in chunks, until they are whole
        self.partials = PartialUpdates(cfg.limits.max_update_bytes)
        self._strangers: set[str] = set()  # not enrolled, already logged once

    def _device_of(self, topic: str) -> str | None:
        parsed = self.topics.parse_device_topic(topic)
        return parsed[0] if parsed else None

    def _admitted(self, topic: str, kind: str) -> str | None:
        """The device a message comes from, if it may be read further."""
        device_id = self._device_of(topic)
        if device_id is None or not self.guard.admit(device_id):
            return None
        if device_id not in self.enrolled:
            self._stranger(device_id)
            self.guard.reject(device_id, kind, "not_enrolled", "device is not enrolled")
            return None
        return device_id

    # -- status and telemetry -----------------------------------------------------------------

    def _decoded(self, topic: str, payload: bytes, kind: str, decode: Callable[[bytes], T]
                  ) -> tuple[str, T] | None:
        """The sending device and its message, once admitted and decoded; None (rejected and
        counted where it is the device's doing) otherwise."""
        device_id = self._admitted(topic, kind)
        if device_id is None:
            return None
        try:
            return device_id, decode(payload)
        except WireError as e:
            self.guard.reject(device_id, kind, e.reason, e.detail)
            return None

    def status(self, topic: str, payload: bytes) -> None:
        # an empty payload clears a retained status: admitted (it counts), nothing to keep
        got = self._decoded(
            topic, payload, "status", lambda p: Status.from_payload(p) if p else None
        )
        if got is None or got[1] is None:
            return
        device_id, status = got
        self.registry.on_status(device_id, status)
        if status.state == "offline":
            log.info("device %s is offline", device_id)
            self._on_change()

    def telemetry(self, topic: str, payload: bytes) -> None:
        got = self._decoded(topic, payload, "telemetry", Telemetry.from_payload)
        if got is not None:
            self.registry.on_telemetry(*got)

    # -- updates and replies --------------------------------------------------------------------

    def update(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        """An update as MQTT delivers it, with the acknowledgement to send when it
        is safe: at once unless it was folded in, else once its sink is checkpointed."""
        device_id = self._device_of(topic)
        if device_id is not None and not self.guard.admit(device_id):
            ack()  # from a quarantined device: dropped unread
            return
        rnd = self._current_round()
        if is_manifest(payload):
            self._expect_chunks(topic, payload, rnd, ack)
        else:
            hold = self.fold(topic, payload, rnd)
            if hold is not None:
                hold(ack)
            else:
                ack()  # rejected (and counted): nothing to keep

    def _expect_chunks(
        self, topic: str, payload: bytes, rnd: Sink | None, ack: Callable[[], None]
    ) -> None:
        """The manifest of a chunked update: checked against the open round before its chunks
        take any memory, for a participant only."""
        self._expire(rnd)
        device_id = self._sender(topic, rnd)
        if device_id is None:
            ack()
            return
        try:
            manifest = BlobManifest.from_payload(
                payload, kind="update", max_bytes=self.cfg.limits.max_update_bytes
            )
        except WireError as e:
            ack()
            self._reject(device_id, e.reason, e.detail, rnd)
            return
        refusal = self._refusal(device_id, manifest, rnd)
        if refusal is not None:
            self.partials.refuse(device_id, manifest.blob.id)
            ack()
            self._reject(device_id, *refusal, rnd)
            return
        assert rnd is not None
        try:
            self.partials.begin(device_id, manifest, manifest.round, ack)
        except WireError as e:  # acknowledged there
            self._reject(device_id, e.reason, e.detail, rnd)

    @staticmethod
    def _refusal(
        device_id: str, manifest: BlobManifest, rnd: Sink | None
    ) -> tuple[str, str] | None:
        """Why a chunked update cannot be folded into ``rnd`` whatever its chunks hold, as the
        update's own decoding would say it: (reason, detail), or None."""
        if rnd is None:
            return "no_round", "no round is open"
        return rnd.admits(device_id, manifest.round, manifest.version)

    def update_chunk(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        """A chunk of an update, with the acknowledgement to send when it is safe: with the
        update's other messages once its round is checkpointed if it was folded in, else at
        once."""
        parsed = self.topics.parse_update_chunk(topic)
        if parsed is None:
            ack()
            self._reject(None, "topic", f"update chunk on unexpected topic {topic[:120]!r}", None)
            return
        device_id, blob_id, index = parsed
        if not self.guard.admit(device_id):
            ack()  # from a quarantined device: dropped unread
            return
        rnd = self._current_round()
        self._expire(rnd)
        if self._sender(self.topics.update(device_id), rnd) is None:
            ack()
            return
        try:
            got = self.partials.add(device_id, blob_id, index, payload, ack)
        except WireError as e:  # acknowledged there
            self._reject(device_id, e.reason, e.detail, rnd)
            return
        if got is None:
            return
        whole, acks = got
        # the partial was for the open round (expired otherwise): the update takes the path of
        # one sent in one piece, and every message that brought it is acknowledged with it
        hold = self.fold(self.topics.update(device_id), whole, rnd)
        for held in acks:
            if hold is not None:
                hold(held)
            else:
                held()

    def _expire(self, rnd: Sink | None) -> None:
        """Drop the partial updates of rounds that closed (their messages acknowledged)."""
        for device_id in self.partials.expire(rnd.is_open if rnd else lambda _round: False):
            self._reject(device_id, "incomplete", "chunked update incomplete when its round "
                         "closed", None)

    def _sender(self, topic: str, rnd: Sink | None) -> str | None:
        """The enrolled device an update comes from; None (rejected and counted) otherwise."""
        device_id = self._device_of(topic)
        if device_id is None:
            self._reject(None, "topic", f"update on unexpected topic {topic[:120]!r}", rnd)
            return None
        if device_id not in self.enrolled:
            self._stranger(device_id)
            self._reject(device_id, "not_enrolled", "device is not enrolled", rnd)
            return None
        return device_id

    def fold(self, topic: str, payload: bytes, rnd: Sink | None) -> Hold | None:
        """Validate an update and fold it into ``rnd``. Returns where the acknowledgements of
        the messages that brought it wait (``rnd.hold_ack`` if it was accepted, the original's
        place for a redelivered copy), or None: acknowledge them at once."""
        device_id = self._sender(topic, rnd)
        if device_id is None:
            return None
        limits = self.cfg.limits
        expect_round, expect_base = rnd.expected() if rnd is not None else (None, None)
        try:
            # with no round open it is still decoded: junk is invalid (and counts towards a
            # quarantine) whether or not a round is open; a valid update is merely late
            update = decode_update(
                payload,
                topic_device_id=device_id,
                spec=self.spec,
                expect_round=expect_round,
                expect_base=expect_base,
                max_bytes=limits.max_update_bytes,
            )
            if rnd is None:
                self._reject(device_id, "no_round", "no round is open", rnd)
                return None
            biggest = max(float(np.abs(v).max(initial=0.0)) for v in update.delta.values())
            if biggest > limits.max_delta_abs:
                raise WireError(
                    "magnitude",
                    f"a value of {biggest:.3g} (limits.max_delta_abs is {limits.max_delta_abs:g})",
                )
            rnd.offer(update, len(payload))
        except WireError as e:
            self._reject(device_id, e.reason, e.detail, rnd)
            return None
        except Duplicate as e:
            self._reject(device_id, "duplicate", str(e), rnd)
            return e.hold
        except NotParticipant as e:
            self._reject(device_id, "not_participant", str(e), rnd)
            return None
        sent = rnd.sent_at.get(device_id)
        energy = self.registry.on_work(
            device_id,
            update.metrics,
            payload_bytes=len(payload),
            turnaround_s=None if sent is None else time.time() - sent,
        )
        rnd.add_energy(device_id, energy)
        self._on_change()
        return rnd.hold_ack

    def reply(self, topic: str, payload: bytes) -> None:
        """A device says it sends no update for a task: declined, late, or superseded."""
        device_id = self._device_of(topic)
        got = self._decoded(
            topic, payload, "reply", lambda p: Reply.from_payload(p, topic_device_id=device_id)
        )
        if got is None:
            return
        device_id, reply = got
        rnd = self._current_round()
        # what the work cost counts, and tells its speed, even when the round is over
        energy = self.registry.on_work(device_id, reply.metrics, completed=False)
        if rnd is None or not rnd.withdraw(device_id, reply.kind, reply.round):
            log.debug("%s: %s for round %d: %s", device_id, reply.kind, reply.round, reply.reason)
            return
        rnd.add_energy(device_id, energy)
        log.info("round %d: %s %s (%s)", reply.round, device_id, reply.kind, reply.reason)
        self._on_reply(rnd, reply)

    def _reject(self, device_id: str | None, reason: str, detail: str, rnd: Sink | None) -> None:
        self.rejected[reason] += 1
        if device_id is not None:
            self.registry.on_rejected(device_id)
        if rnd is not None:
            rnd.count_rejection(reason)
        self.guard.reject(device_id, "update", reason, detail)

    def _stranger(self, device_id: str) -> None:
        if device_id not in self._strangers:
            self._strangers.add(device_id)
            log.warning("ignoring %s: not on the list of enrolled devices (%s)", device_id,
                        self.enrolled.path)
