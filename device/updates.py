"""From a round's training to the bytes of its update envelope.

The update is the delta from the base model the round started from (the model as the device
holds it, which is exactly the aggregator's: see device/model_sync.py), encoded with the codec
the task names, in the compact envelope. For a compressing codec the delta goes through error
feedback first (edgefl/error_feedback.py): clipping, momentum correction, the residual of
earlier rounds. The new residual is kept only once the agent decides to publish: call
:meth:`UpdateEncoder.commit` right before publishing, and not at all for an update it drops.

:func:`publish_update` sends it: as one message when it fits the broker's packet limit, else as
a manifest on devices/{id}/update followed by its chunks (edgefl/chunking.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from paho.mqtt.client import MQTTMessageInfo

from edgefl.chunking import chunk_size_for, fits, publish_chunks, split
from edgefl.compression import ModelSpec, PackedCodec, flatten, unflatten
from edgefl.error_feedback import FILE_NAME, ErrorFeedback
from edgefl.messages import BlobManifest, GlobalModel, Task, Update, encode_compact_update
from edgefl.mqtt import AckedCallback, MqttLink
from edgefl.topics import Topics


class UpdateEncoder:
    def __init__(self, device_id: str, state_dir: str | Path) -> None:
        self.device_id = device_id
        self.state_dir = Path(state_dir)
        self.feedback: ErrorFeedback | None = None  # loaded with the first update

    def encode(
        self,
        task: Task,
        base: GlobalModel,
        trained: Mapping[str, np.ndarray],
        num_samples: int,
        metrics: dict[str, float],
        spec: ModelSpec | None = None,
    ) -> bytes:
        """The envelope of ``trained - base`` over ``spec`` (default: every tensor of the
        model; FedPer and FedRep send the shared ones alone), error feedback included."""
        codec = task.codec
        if spec is None:
            spec = {k: tuple(np.shape(v)) for k, v in base.weights.items()}
        if self.feedback is None or self.feedback.spec != spec:
            self.feedback = ErrorFeedback(self.state_dir / FILE_NAME, spec)
        delta = flatten(trained, spec) - flatten(base.weights, spec)
        if isinstance(codec, PackedCodec):
            # stochastic rounding, reproducible per device and round
            seed = hashlib.sha256(f"{self.device_id}/{task.round}/quantize".encode()).digest()
            data = self.feedback.compress(
                delta,
                codec,
                base_version=task.base_version,
                round_=task.round,
                rng=np.random.default_rng(int.from_bytes(seed[:8], "big")),
            )
        else:
            delta = self.feedback.flush(delta, base_version=task.base_version, round_=task.round)
            data = codec.encode(unflatten(delta, spec))
        update = Update(
            device_id=self.device_id,
            round=task.round,
            base_version=task.base_version,
            num_samples=num_samples,
            delta={},
            metrics=metrics,
        )
        return encode_compact_update(update, codec, spec, data)

    def commit(self) -> None:
        """Keep the error feedback of the update just encoded: it is about to be published."""
        if self.feedback is not None:
            self.feedback.commit()


def publish_update(
    link: MqttLink,
    topics: Topics,
    device_id: str,
    task: Task,
    payload: bytes,
    on_acked: AckedCallback | None = None,
) -> MQTTMessageInfo:
    """Publish an update envelope (QoS 1); returns the handle of its last message, whose PUBACK
    means the whole update reached the broker (``on_acked`` is called then: MqttLink.publish).

    One message when it fits the broker's packet limit (``link.packet_limit``). Otherwise a
    manifest (edgefl.messages.BlobManifest) on devices/{id}/update first, so that the
    aggregator knows what to expect, then the chunks on devices/{id}/update/blob/{blob}/{i},
    not retained: the aggregator's persistent session queues them while it is away, and it
    acknowledges every one of them only once the checkpoint holding the update is on its disk
    (aggregator/reassembly.py).
    """
    topic = topics.update(device_id)
    limit = link.packet_limit
    if fits(len(payload), limit):
        return link.publish(topic, payload, qos=1, on_acked=on_acked)
    blob, chunks = split(payload, chunk_size_for(limit))
    manifest = BlobManifest("update", task.base_version, task.round, blob)
    link.publish(topic, manifest.to_payload(), qos=1)  # first: the chunks are expected
    return publish_chunks(link, topic, blob, chunks, retain=False, on_acked=on_acked)[-1]
