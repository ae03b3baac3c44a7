"""Updates that came in chunks, put back together per device with bounded memory.

A device whose update is larger than the broker's packet limit sends a manifest on
devices/{id}/update, then the chunks on devices/{id}/update/blob/{blob}/{i} (device/updates.py,
edgefl/chunking.py). The intake (aggregator/intake.py) checks the manifest against the open
round and hands it here; each chunk is checked against it (blob, index, count, exact length) as
it arrives, and the whole, once its SHA-256 matched, goes through the very path a single-packet
update takes: validated, folded exactly once.

Memory: a device holds at most one partial update, of at most ``limits.max_update_bytes``
(the manifest's size is checked before anything is kept), and only a participant of the open
round may start one; a partial that its round closed on is dropped.

Acknowledgements: every message of a chunked update (manifest and chunks) is a QoS 1 message the
broker keeps until it is acknowledged. This class owns the acknowledgement of each message it
is given: it sends it when it drops what the message brought (a refused, superseded or expired
partial), and hands every one of them back with the whole update, for the intake to hold until
the round's checkpoint is on the disk (aggregator/rounds.py). An aggregator that dies before
then gets the manifest and every chunk again from the broker, and folds the update then.

Thread-safety: called from the network thread only, like the rest of the intake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgefl.chunking import Assembler
from edgefl.compression import WireError
from edgefl.messages import BlobManifest

Ack = Callable[[], None]


@dataclass
class _Partial:
    manifest: BlobManifest
    assembler: Assembler
    round: int  # the round it is for; it is dropped once another is open
    acks: list[Ack] = field(default_factory=list)


class PartialUpdates:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._partials: dict[str, _Partial] = {}
        # per device, the blob it sent last that is whole, refused or dropped: its remaining
        # chunks (and QoS 1 redeliveries of them) are acknowledged and dropped without a word
        self._done: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._partials)

    def held_bytes(self) -> int:
        """Bytes the partial updates may grow to (their manifests' sizes)."""
        return sum(p.manifest.blob.size for p in self._partials.values())

    def begin(self, device_id: str, manifest: BlobManifest, round_: int, ack: Ack) -> None:
        """Expect the chunks ``manifest`` names from ``device_id``, for round ``round_``.

        A second manifest of the same blob (a QoS 1 redelivery) changes nothing. A device that
        already holds a partial update of another blob for this round is refused
        (``too_many_partials``); so is a manifest larger than ``max_bytes`` (``too_large``).
        WireError then, with the manifest acknowledged."""
        held = self._partials.get(device_id)
        if held is not None and held.manifest.blob.sha256 == manifest.blob.sha256:
            held.acks.append(ack)
            return
        try:
            if held is not None and held.round == round_:
                raise WireError(
                    "too_many_partials",
                    f"a second chunked update ({manifest.blob.id}) while "
                    f"{held.manifest.blob.id} is incomplete ({held.assembler.missing} chunks "
                    "missing)",
                )
            assembler = Assembler(manifest.blob, self.max_bytes)
        except WireError:
            self.refuse(device_id, manifest.blob.id)
            ack()
            raise
        if held is not None:  # of an earlier round: its round is over, it cannot count
            self.drop(device_id)
        self._partials[device_id] = _Partial(manifest, assembler, round_, [ack])

    def add(
        self, device_id: str, blob_id: str, index: int, payload: bytes, ack: Ack
    ) -> tuple[bytes, list[Ack]] | None:
        """Keep one chunk (its topic named ``blob_id`` and ``index``). Returns the whole
        update and the acknowledgements of all its messages once every chunk is in; None while
        chunks are missing, or for a chunk of a blob already whole or refused (acknowledged).

        WireError, with the chunk acknowledged, for a chunk of no blob the device announced
        (``unknown_blob``) and for a chunk that does not match its manifest (index, count,
        length, format) or completes a blob whose SHA-256 does not match (``checksum``): the
        partial update is then dropped and its messages acknowledged."""
        held = self._partials.get(device_id)
        if held is None or held.manifest.blob.id != blob_id:
            ack()
            if self._done.get(device_id) == blob_id:
                return None
            raise WireError("unknown_blob", f"chunk {index} of blob {blob_id}, not announced")
        held.acks.append(ack)
        try:
            whole = held.assembler.add(payload, index=index, strict=True)
        except WireError:
            self.drop(device_id)
            raise
        if whole is None:
            return None
        del self._partials[device_id]
        self._done[device_id] = blob_id
        return whole, held.acks

    def refuse(self, device_id: str, blob_id: str) -> None:
        """The manifest of ``blob_id`` was refused: its chunks are dropped quietly."""
        self._done[device_id] = blob_id

    def drop(self, device_id: str) -> bool:
        """Give up the device's partial update, acknowledging its messages; False if none."""
        held = self._partials.pop(device_id, None)
        if held is None:
            return False
        self._done[device_id] = held.manifest.blob.id
        for ack in held.acks:
            ack()
        return True

    def expire(self, is_open: Callable[[int], bool]) -> list[str]:
        """Drop the partial updates whose round (or, in asynchronous mode, task) is no longer
        open: it closed before they were whole. The devices whose were dropped."""
        stale = [d for d, p in self._partials.items() if not is_open(p.round)]
        for device_id in stale:
            self.drop(device_id)
        return stale
