"""Updates in chunks at the aggregator's intake (aggregator/reassembly.py, aggregator/intake.py),
driven by hand without a broker: what is folded (once), what is refused and why, and which
acknowledgements are held until the checkpoint and which are sent at once."""

from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import pytest

from aggregator.intake import Intake
from aggregator.reassembly import PartialUpdates
from aggregator.registry import DeviceRegistry
from aggregator.rounds import Round
from device.updates import UpdateEncoder
from edgefl.chunking import chunk_topic, split
from edgefl.config import AggregatorConfig, BrokerConfig
from edgefl.messages import BlobManifest, GlobalModel, Task
from edgefl.models import build_model, get_weights, model_spec
from edgefl.topics import Topics
from tests.conftest import FLEET

TOPICS = Topics(FLEET)
CHUNK = 8192


class Acks:
    """Stands in for the link's acknowledgements: counts each one sent, and fails on a second
    acknowledgement of the same message (a packet id may be reused: acking twice could
    acknowledge someone else's update)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, name: str):
        def ack() -> None:
            assert name not in self.sent, f"{name} acknowledged twice"
            self.sent.append(name)

        return ack


class Setup:
    def __init__(self, tmp_path, *, participants=("dev-a", "dev-b"), **limits) -> None:
        cfg = AggregatorConfig(fleet=FLEET, broker=BrokerConfig(port=1), state_dir=str(tmp_path))
        for k, v in limits.items():
            setattr(cfg.limits, k, v)
        self.quarantined: list[str] = []
        model = build_model("mlp_digits", seed=0)
        self.weights = get_weights(model)
        self.spec = model_spec(model)
        self.rnd: Round | None = Round(1, 0, list(participants), time.time() + 60, self.spec)
        self.intake = Intake(
            cfg,
            self.spec,
            DeviceRegistry(),
            current_round=lambda: self.rnd,
            on_reply=lambda *_: None,
            on_quarantine=lambda d, _r: self.quarantined.append(d),
            on_change=lambda: None,
        )
        self.acks = Acks()
        self.tmp = tmp_path

    def update(self, device_id: str = "dev-a", round_: int = 1, seed: int = 0) -> bytes:
        """A dense update as the device would encode it (38 KB: five chunks of 8 KiB)."""
        rng = np.random.default_rng(seed)
        base = GlobalModel(0, 0, "mlp_digits", {k: v.copy() for k, v in self.weights.items()})
        trained = {
            k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.weights.items()
        }
        task = Task(round=round_, base_version=0, epochs=1, batch_size=32, lr=0.1,
                    codec={"name": "dense_fp32", "zstd": False}, deadline=time.time() + 60)
        enc = UpdateEncoder(device_id, self.tmp / f"ef-{device_id}-{seed}")
        return enc.encode(task, base, trained, 50, {"train_s": 0.1, "steps": 3.0})

    def manifest(self, payload: bytes, device_id: str = "dev-a", round_: int = 1, **change):
        blob, chunks = split(payload, CHUNK)
        obj = json.loads(BlobManifest("update", 0, round_, blob).to_payload())
        obj.update(change)
        name = f"{device_id}/manifest/{len(self.acks.sent)}/{time.perf_counter_ns()}"
        self.intake.update(TOPICS.update(device_id), json.dumps(obj).encode(), self.acks(name))
        return blob, chunks

    def chunk(self, device_id: str, blob, index: int, payload: bytes, topic_index=None) -> None:
        i = index if topic_index is None else topic_index
        topic = chunk_topic(TOPICS.update(device_id), blob, i)
        name = f"{device_id}/{blob.id}/{index}/{time.perf_counter_ns()}"
        self.intake.update_chunk(topic, payload, self.acks(name))

    def rejected(self) -> dict[str, int]:
        return dict(self.intake.rejected)


@pytest.fixture
def s(tmp_path) -> Setup:
    return Setup(tmp_path)


def test_a_chunked_update_is_folded_once_and_acknowledged_after_the_checkpoint(s) -> None:
    payload = s.update()
    blob, chunks = s.manifest(payload)
    assert blob.count == 5
    for i in (3, 0, 4, 1):  # any order
        s.chunk("dev-a", blob, i, chunks[i])
    assert s.rnd.reported == 0 and len(s.intake.partials) == 1
    s.chunk("dev-a", blob, 2, chunks[2])
    assert s.rnd.reported == 1 and len(s.intake.partials) == 0
    assert s.rnd.uplink_bytes == len(payload)
    # nothing acknowledged until the round's checkpoint is on the disk, then all six at once
    assert s.acks.sent == []
    assert s.rnd.release_acks() == 6
    assert len(s.acks.sent) == 6
    # the same update sent in one piece gives the same sum
    whole = Round(1, 0, ["dev-a"], time.time() + 60, s.spec)
    assert s.intake.fold(TOPICS.update("dev-a"), payload, whole)
    for k, v in s.rnd.aggregate().items():
        np.testing.assert_array_equal(v, whole.aggregate()[k])
    assert s.rejected() == {}


def test_redelivered_manifest_and_chunks_are_folded_once(s) -> None:
    payload = s.update()
    blob, chunks = s.manifest(payload)
    s.manifest(payload)  # a QoS 1 redelivery of the manifest mid-way: the same partial
    s.chunk("dev-a", blob, 0, chunks[0])
    s.chunk("dev-a", blob, 0, chunks[0])  # and of a chunk
    for i in range(1, 5):
        s.chunk("dev-a", blob, i, chunks[i])
    assert s.rnd.reported == 1
    s.chunk("dev-a", blob, 4, chunks[4])  # a late copy of a chunk of a whole update: dropped
    assert s.rejected() == {}
    # after a reconnect the broker sends every unacknowledged message again: one duplicate
    s.manifest(payload)
    for i in range(5):
        s.chunk("dev-a", blob, i, chunks[i])
    assert s.rnd.reported == 1 and s.rnd.sum.count == 1
    assert s.rejected() == {"duplicate": 1}
    # the late copy of a chunk at once; the duplicate's six wait with the original's: the
    # broker must not forget the update before the checkpoint that holds it is on the disk
    assert len(s.acks.sent) == 1
    assert s.rnd.release_acks() == 8 + 6  # two manifests and six chunks, and the copy's six
    assert len(s.acks.sent) == 1 + 8 + 6


def test_a_redelivered_whole_update_is_acknowledged_with_the_original(s) -> None:
    payload = s.update()
    topic = TOPICS.update("dev-a")
    s.intake.update(topic, payload, s.acks("first"))
    s.intake.update(topic, payload, s.acks("copy"))  # after a reconnect
    assert s.rnd.reported == 1 and s.rejected() == {"duplicate": 1}
    assert s.acks.sent == []
    assert s.rnd.release_acks() == 2 and sorted(s.acks.sent) == ["copy", "first"]


def test_a_chunk_of_no_announced_blob_is_refused(s) -> None:
    blob, chunks = split(s.update(), CHUNK)
    s.chunk("dev-a", blob, 0, chunks[0])
    assert s.rejected() == {"unknown_blob": 1}
    assert s.intake.guard.rejected["update/unknown_blob"] == 1
    assert len(s.acks.sent) == 1 and len(s.intake.partials) == 0


@pytest.mark.parametrize(
    "tamper, reason",
    [
        ("index", "malformed"),  # chunk 1 on the topic of chunk 2
        ("count", "malformed"),  # a chunk of a blob cut into more chunks than announced
        ("length", "size"),  # the right index, the wrong number of bytes
        ("garbage", "malformed"),
        ("oversize", "too_large"),
    ],
)
def test_a_chunk_that_disagrees_with_its_manifest_drops_the_update(s, tamper, reason) -> None:
    payload = s.update()
    blob, chunks = s.manifest(payload)
    s.chunk("dev-a", blob, 0, chunks[0])
    if tamper == "index":
        s.chunk("dev-a", blob, 1, chunks[1], topic_index=2)
    elif tamper == "count":
        obj = msgpack.unpackb(chunks[1])
        obj["n"] = 6
        s.chunk("dev-a", blob, 1, msgpack.packb(obj))
    elif tamper == "length":
        obj = msgpack.unpackb(chunks[1])
        obj["data"] = obj["data"][:-1]
        s.chunk("dev-a", blob, 1, msgpack.packb(obj))
    elif tamper == "garbage":
        s.chunk("dev-a", blob, 1, b"\xc1" * 100)
    else:
        s.chunk("dev-a", blob, 1, chunks[1] + b"x" * 1000)
    assert s.rejected() == {reason: 1}
    assert s.intake.guard.rejected[f"update/{reason}"] == 1
    # the partial is gone and everything it held acknowledged; its other chunks are dropped
    # without adding to the device's count of invalid messages
    assert len(s.intake.partials) == 0 and len(s.acks.sent) == 3
    for i in range(2, 5):
        s.chunk("dev-a", blob, i, chunks[i])
    assert s.rejected() == {reason: 1} and s.rnd.reported == 0


def test_a_blob_whose_sha256_does_not_match_is_refused(s) -> None:
    payload = s.update()
    blob, chunks = split(payload, CHUNK)
    other = split(s.update(seed=1), CHUNK)[0]
    s.manifest(payload, sha256=other.sha256)  # names another blob of the same shape
    faked = [c.replace(blob.id.encode(), other.id.encode()) for c in chunks]
    for i in range(5):
        s.chunk("dev-a", other, i, faked[i])
    assert s.rejected() == {"checksum": 1}
    assert s.rnd.reported == 0 and len(s.intake.partials) == 0
    assert len(s.acks.sent) == 6


def test_one_partial_update_per_device_and_none_larger_than_the_limit(tmp_path) -> None:
    s = Setup(tmp_path, max_update_bytes=40_000)
    first, second = s.update(), s.update(seed=1)
    blob, chunks = s.manifest(first)
    s.manifest(second)  # a second blob while the first is incomplete
    assert s.rejected() == {"too_many_partials": 1}
    assert s.intake.partials.held_bytes() == len(first) <= 40_000
    for i in range(5):
        s.chunk("dev-a", blob, i, chunks[i])
    assert s.rnd.reported == 1  # the first goes on undisturbed
    big = Setup(tmp_path, max_update_bytes=30_000)
    big.manifest(first)
    assert big.rejected() == {"too_large": 1} and len(big.intake.partials) == 0
    assert big.intake.guard.rejected["update/too_large"] == 1


def test_a_manifest_the_round_cannot_take_is_refused_before_any_chunk_is_kept(s) -> None:
    payload = s.update("dev-c")
    blob, chunks = s.manifest(payload, "dev-c")
    assert s.rejected() == {"not_participant": 1}
    for i in range(5):  # its chunks: acknowledged and dropped, not counted again
        s.chunk("dev-c", blob, i, chunks[i])
    assert s.rejected() == {"not_participant": 1} and len(s.acks.sent) == 6
    s.manifest(s.update(round_=2), round_=2)
    s.rnd = None
    s.manifest(payload, "dev-b")
    assert s.rejected() == {"not_participant": 1, "round": 1, "no_round": 1}
    assert len(s.intake.partials) == 0
    assert not s.quarantined  # honest devices produce these: benign


def test_a_partial_update_its_round_closed_on_is_dropped_and_acknowledged(s) -> None:
    payload = s.update()
    blob, chunks = s.manifest(payload)
    s.chunk("dev-a", blob, 0, chunks[0])
    s.rnd = Round(2, 1, ["dev-a"], time.time() + 60, s.spec)  # round 1 closed, 2 opens
    s.chunk("dev-a", blob, 1, chunks[1])  # a straggler of round 1's update
    assert s.rejected() == {"incomplete": 1}
    assert len(s.intake.partials) == 0 and len(s.acks.sent) == 3
    assert not s.quarantined


def test_a_device_sending_bad_chunks_is_quarantined(s) -> None:
    blob, chunks = split(s.update(), CHUNK)
    for _ in range(s.intake.cfg.quarantine.max_invalid + 1):
        s.chunk("dev-a", blob, 0, chunks[0])  # never announced
    assert s.quarantined == ["dev-a"]


def test_partial_updates_own_every_acknowledgement_they_are_given() -> None:
    acks = Acks()
    parts = PartialUpdates(max_bytes=1 << 20)
    blob, chunks = split(b"x" * 20_000, CHUNK)
    parts.begin("dev-a", BlobManifest("update", 0, 1, blob), 1, acks("m"))
    assert parts.add("dev-a", blob.id, 0, chunks[0], acks("c0")) is None
    assert parts.expire(lambda r: r == 1) == [] and acks.sent == []
    assert parts.expire(lambda r: r == 2) == ["dev-a"]
    assert acks.sent == ["m", "c0"]
