"""Chunked blobs and rollout manifests: what a device accepts, and what it refuses."""

from __future__ import annotations

import hashlib
import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefl.chunking import (
    CHUNK_OVERHEAD,
    MAX_CHUNKS,
    MIN_CHUNK,
    PACKET_OVERHEAD,
    Assembler,
    Blob,
    chunk_filter,
    chunk_size_for,
    chunk_topic,
    fits,
    split,
)
from edgefl.compression import WireError
from edgefl.messages import (
    COMPACT_MAGIC,
    FORMAT_VERSION,
    BlobManifest,
    Deployment,
    is_manifest,
)
from edgefl.topics import Topics

BODY = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes: not a multiple of the chunk size


def test_split_and_reassemble_in_any_order() -> None:
    blob, chunks = split(BODY, 1000)
    assert blob.count == len(chunks) == 11
    assert blob.sha256 == hashlib.sha256(BODY).hexdigest()
    a = Assembler(blob, max_size=1 << 20)
    order = [5, 0, 10, 3, 1, 2, 4, 6, 7, 9, 8]
    results = [a.add(chunks[i]) for i in order]
    assert results[:-1] == [None] * 10
    assert results[-1] == BODY


def test_a_repeated_chunk_is_harmless() -> None:
    blob, chunks = split(BODY, 4096)
    a = Assembler(blob, 1 << 20)
    assert a.add(chunks[0]) is None
    assert a.add(chunks[0]) is None
    assert a.missing == 2
    assert a.add(chunks[1]) is None
    assert a.add(chunks[2]) == BODY


def test_small_payload_is_one_chunk() -> None:
    blob, chunks = split(b"abc", 1000)
    assert blob.count == 1
    assert Assembler(blob, 100).add(chunks[0]) == b"abc"


def test_topics_name_the_blob() -> None:
    blob, _ = split(BODY, 1000)
    assert chunk_topic("edgefl/f/model/onnx", blob, 3) == f"edgefl/f/model/onnx/blob/{blob.id}/3"
    assert chunk_filter("edgefl/f/model/onnx", blob) == f"edgefl/f/model/onnx/blob/{blob.id}/+"


def _chunk(**fields) -> bytes:
    obj = {"fmt": "edgefl.chunk", "v": 1, "id": "", "i": 0, "n": 1, "data": b""}
    obj.update(fields)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.fixture
def blob_and_chunks():
    return split(BODY, 1000)


def _rejected(assembler: Assembler, payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        assembler.add(payload)
    assert info.value.reason == reason, str(info.value)


def test_chunk_of_the_wrong_length(blob_and_chunks) -> None:
    blob, _ = blob_and_chunks
    _rejected(Assembler(blob, 1 << 20), _chunk(id=blob.id, i=0, n=11, data=b"x" * 999), "size")


def test_chunk_index_out_of_range(blob_and_chunks) -> None:
    blob, _ = blob_and_chunks
    a = Assembler(blob, 1 << 20)
    _rejected(a, _chunk(id=blob.id, i=11, n=11, data=b"x" * 1000), "malformed")
    _rejected(a, _chunk(id=blob.id, i=-1, n=11, data=b"x" * 1000), "malformed")


def test_chunk_count_that_disagrees_with_the_manifest(blob_and_chunks) -> None:
    blob, _ = blob_and_chunks
    _rejected(
        Assembler(blob, 1 << 20), _chunk(id=blob.id, i=0, n=12, data=b"x" * 1000), "malformed"
    )


def test_chunk_garbage_and_oversize(blob_and_chunks) -> None:
    blob, _ = blob_and_chunks
    a = Assembler(blob, 1 << 20)
    _rejected(a, b"\xc1\xff\x00", "malformed")
    _rejected(a, b"x" * 5000, "too_large")
    _rejected(a, msgpack.packb([1, 2, 3]), "malformed")
    _rejected(a, _chunk(id=blob.id, v=2), "version")
    _rejected(a, _chunk(id=blob.id, i="0", data=b"x" * 1000), "malformed")


def test_chunk_of_another_blob_is_ignored(blob_and_chunks) -> None:
    blob, _ = blob_and_chunks
    _, other = split(b"another model", 1000)
    assert Assembler(blob, 1 << 20).add(other[0]) is None


def test_tampered_chunk_fails_the_checksum(blob_and_chunks) -> None:
    blob, chunks = blob_and_chunks
    a = Assembler(blob, 1 << 20)
    for c in chunks[:-1]:
        a.add(c)
    last = msgpack.unpackb(chunks[-1])
    last["data"] = bytes(len(last["data"]))
    _rejected(a, msgpack.packb(last, use_bin_type=True), "checksum")


@pytest.mark.parametrize(
    "blob, reason",
    [
        (Blob("0" * 64, 10, 4, 3), None),
        (Blob("0" * 63, 10, 4, 3), "malformed"),
        (Blob("G" * 64, 10, 4, 3), "malformed"),
        (Blob("0" * 64, 10, 4, 2), "malformed"),  # 10 bytes in 4s are 3 chunks
        (Blob("0" * 64, 0, 4, 1), "too_large"),
        (Blob("0" * 64, 2000, 4, 500), "too_large"),  # over max_size below
        (Blob("0" * 64, 10, 0, 3), "malformed"),
        (Blob("0" * 64, MAX_CHUNKS + 1, 1, MAX_CHUNKS + 1), "too_large"),
    ],
)
def test_blob_descriptor_checks(blob: Blob, reason: str | None) -> None:
    if reason is None:
        blob.check(max_size=1000)
        return
    with pytest.raises(WireError) as info:
        blob.check(max_size=1000)
    assert info.value.reason == reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1200))
def test_arbitrary_chunks_only_raise_wire_errors(data: bytes) -> None:
    blob, _ = split(BODY, 1000)
    a = Assembler(blob, 1 << 20)
    try:
        assert a.add(data) is None
    except WireError:
        pass


# -- the rollout manifest ---------------------------------------------------------------------


def _deployment(**changes) -> Deployment:
    blob, _ = split(BODY, 1000)
    fields = dict(
        version=7,
        round=7,
        model="mlp_digits",
        variant="fp32",
        sha256=blob.sha256,
        size=blob.size,
        chunk_size=blob.chunk_size,
        chunks=blob.count,
        seq=3,
        metadata={"accuracy": "0.93"},
        canaries=["dev-1"],
    )
    fields.update(changes)
    return Deployment(**fields)


def test_manifest_round_trip() -> None:
    sent = _deployment()
    got = Deployment.from_payload(sent.to_payload(), model="mlp_digits")
    assert got == sent
    assert got.blob == split(BODY, 1000)[0]


def _manifest_rejected(obj: dict, reason: str, **kw) -> None:
    with pytest.raises(WireError) as info:
        Deployment.from_payload(json.dumps(obj).encode(), **{"model": "mlp_digits", **kw})
    assert info.value.reason == reason, str(info.value)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"v": 1}, "version"),
        ({"v": FORMAT_VERSION + 1}, "version"),
        ({"model": "mlp_mnist"}, "model"),
        ({"variant": "int4"}, "malformed"),
        ({"metadata": {"a": 1}}, "malformed"),
        ({"canaries": ["Dev 1"]}, "malformed"),
        ({"canaries": "dev-1"}, "malformed"),
        ({"chunks": 3}, "malformed"),
        ({"sha256": "abc"}, "malformed"),
        ({"size": -1}, "malformed"),
        ({"seq": 1.5}, "malformed"),
    ],
)
def test_manifest_rejections(change: dict, reason: str) -> None:
    obj = json.loads(_deployment().to_payload())
    obj.update(change)
    _manifest_rejected(obj, reason)


def test_manifest_bigger_than_the_device_allows() -> None:
    obj = json.loads(_deployment().to_payload())
    _manifest_rejected(obj, "malformed", max_bytes=1000)


# -- what any message too large for a packet uses: the limit, the blob manifest, chunk topics --


def test_a_payload_is_split_only_when_it_would_not_fit_the_packet_limit() -> None:
    assert fits(10_000, None)  # no limit known: one message, as before chunking
    assert fits(10_000, 10_000 + PACKET_OVERHEAD)
    assert not fits(10_001, 10_000 + PACKET_OVERHEAD)
    # a chunk, its own fields, topic and headers fit the limit, and never exceed `preferred`
    assert chunk_size_for(16384) == 16384 - CHUNK_OVERHEAD - PACKET_OVERHEAD
    assert chunk_size_for(16384, preferred=4096) == 4096
    assert chunk_size_for(None, preferred=4096) == 4096
    assert chunk_size_for(100) == MIN_CHUNK


def test_the_assembler_checks_the_topic_index_and_strictly_the_blob() -> None:
    blob, chunks = split(BODY, 4096)
    a = Assembler(blob, 1 << 20)
    with pytest.raises(WireError, match="topic of chunk 2") as info:
        a.add(chunks[0], index=2)
    assert info.value.reason == "malformed"
    other, other_chunks = split(BODY[::-1], 4096)
    assert a.add(other_chunks[0]) is None  # a retained chunk of an older rollout: ignored
    with pytest.raises(WireError, match="another blob"):
        a.add(other_chunks[0], strict=True)
    assert a.missing == 3


def test_blob_manifest_round_trip_and_is_told_apart_from_the_message() -> None:
    blob, _ = split(BODY, 1000)
    sent = BlobManifest("update", 4, 5, blob)
    payload = sent.to_payload()
    assert is_manifest(payload)
    assert BlobManifest.from_payload(payload, kind="update", max_bytes=1 << 20) == sent
    # what a manifest stands in for never starts like one
    assert not is_manifest(bytes([COMPACT_MAGIC]) + b"\x02")
    assert not is_manifest(msgpack.packb({"fmt": "edgefl.model"}))
    assert not is_manifest(b"")


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"kind": "model"}, "malformed"),  # a model manifest on an update topic
        ({"v": 1}, "version"),
        ({"fmt": "edgefl.chunk"}, "malformed"),
        ({"chunks": 3}, "malformed"),
        ({"chunk_size": 0}, "malformed"),
        ({"sha256": "ABC"}, "malformed"),
        ({"round": -1}, "malformed"),
        ({"version": True}, "malformed"),
        ({"extra": 1}, "malformed"),
        ({"size": 1 << 21}, "too_large"),
    ],
)
def test_blob_manifest_rejections(change: dict, reason: str) -> None:
    obj = json.loads(BlobManifest("update", 0, 1, split(BODY, 1000)[0]).to_payload())
    obj.update(change)
    if "size" in change:
        obj["chunk_size"] = change["size"]
        obj["chunks"] = 1
    with pytest.raises(WireError) as info:
        BlobManifest.from_payload(json.dumps(obj).encode(), kind="update", max_bytes=1 << 20)
    assert info.value.reason == reason, str(info.value)


def test_update_chunk_topics_parse_strictly() -> None:
    t = Topics("fleet")
    blob, _ = split(BODY, 1000)
    topic = chunk_topic(t.update("dev-1"), blob, 7)
    assert t.parse_update_chunk(topic) == ("dev-1", blob.id, 7)
    assert t.all_update_chunks == "edgefl/fleet/devices/+/update/blob/+/+"
    for bad in [
        t.update("dev-1"),
        topic.replace("/update/", "/status/"),
        topic.replace("edgefl/fleet/", "edgefl/other/"),
        topic[:-1] + "x",
        topic[:-1] + "-1",
        topic[:-1] + "\u0663",  # a digit, but not an ASCII one
        topic[:-1] + str(MAX_CHUNKS),
        topic.replace(blob.id, blob.id.upper()),
        topic.replace(blob.id, blob.id[:-1]),
        topic + "/0",
        topic.replace("dev-1", "Dev 1"),
    ]:
        assert t.parse_update_chunk(bad) is None, bad
