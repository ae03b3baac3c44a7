"""Error feedback on the device (edgefl/error_feedback.py, device/updates.py), the downlink
broadcast (aggregator/broadcast.py) and the device's model sync (device/model_sync.py), without
a broker: the arithmetic, the persistence across restarts, the missed-round policy, and that
aggregator and device arrive at bit-identical models."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.broadcast import ModelBroadcast
from device.model_sync import ModelSync
from device.updates import UpdateEncoder
from edgefl.compression import (
    DenseCodec,
    PruneCodec,
    TopKCodec,
    flatten,
    make_codec,
    num_values,
    unflatten,
)
from edgefl.config import CodecConfig
from edgefl.error_feedback import FILE_NAME, ErrorFeedback
from edgefl.messages import (
    GlobalModel,
    Task,
    apply_delta,
    decode_model,
    decode_model_delta,
    decode_update,
    encode_model,
    weights_digest,
)
from edgefl.topics import Topics

SPEC = {"w": (20, 10), "b": (10,)}
N = num_values(SPEC)


def vec(seed: int, scale: float = 0.01) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(N) * scale).astype(np.float32)


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def feedback(tmp_path: Path) -> ErrorFeedback:
    return ErrorFeedback(tmp_path / FILE_NAME, SPEC)


def decoded(codec, payload: bytes) -> np.ndarray:
    return flatten(codec.decode(payload, SPEC), SPEC)


# ---------------------------------------------------------------------------------------------
# the pipeline


def test_the_residual_is_what_was_not_sent_and_joins_the_next_update(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=4)
    d1, d2 = vec(1), vec(2)
    sent1 = decoded(codec, ef.compress(d1, codec, base_version=0, round_=1, rng=rng()))
    ef.commit()
    np.testing.assert_allclose(ef.state.residual, d1 - sent1, atol=1e-7)
    sent2 = decoded(codec, ef.compress(d2, codec, base_version=1, round_=2, rng=rng()))
    ef.commit()
    # nothing is lost: what was sent plus what is held back is everything so far
    np.testing.assert_allclose(sent1 + sent2 + ef.state.residual, d1 + d2, atol=1e-6)


def test_without_error_feedback_nothing_is_kept(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=4, error_feedback=False)
    ef.compress(vec(1), codec, base_version=0, round_=1, rng=rng())
    ef.commit()
    assert ef.state.residual is None
    assert not (tmp_path / FILE_NAME).exists()


def test_dgc_momentum_correction_and_factor_masking(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=32, momentum=0.5)
    d1, d2 = vec(1), vec(2)
    sent1 = decoded(codec, ef.compress(d1, codec, base_version=0, round_=1, rng=rng()))
    ef.commit()
    kept = sent1 != 0
    assert not ef.state.velocity[kept].any()  # masked where sent
    np.testing.assert_array_equal(ef.state.velocity[~kept], d1[~kept])
    payload = ef.compress(d2, codec, base_version=1, round_=2, rng=rng())
    u = np.where(kept, 0, d1) * np.float32(0.5) + d2
    acc = u + np.where(kept, 0, d1)  # velocity plus residual
    top = np.sort(np.argsort(-np.abs(acc))[: round(0.1 * N)])
    np.testing.assert_array_equal(np.flatnonzero(decoded(codec, payload)), top)


def test_local_clipping_bounds_the_update_norm(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=1.0, bits=32, clip=0.05)
    big = vec(1, scale=1.0)
    sent = decoded(codec, ef.compress(big, codec, base_version=0, round_=1, rng=rng()))
    assert np.linalg.norm(sent) == pytest.approx(0.05, rel=1e-5)
    np.testing.assert_allclose(sent / np.linalg.norm(sent), big / np.linalg.norm(big), atol=1e-6)


def test_a_lossless_codec_spends_the_residual(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=4)
    d1 = vec(1)
    sent1 = decoded(codec, ef.compress(d1, codec, base_version=0, round_=1, rng=rng()))
    ef.commit()
    out = ef.flush(vec(2), base_version=1, round_=2)
    np.testing.assert_allclose(out, vec(2) + d1 - sent1, atol=1e-7)
    ef.commit()
    assert ef.state.residual is None and not (tmp_path / FILE_NAME).exists()


def test_an_update_that_is_not_published_leaves_the_state_alone(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=4)
    ef.compress(vec(1), codec, base_version=0, round_=1, rng=rng())
    ef.commit()
    before = ef.state.residual.copy()
    ef.compress(vec(2), codec, base_version=1, round_=2, rng=rng())  # late: never committed
    np.testing.assert_array_equal(ef.state.residual, before)
    np.testing.assert_array_equal(feedback(tmp_path).state.residual, before)


# ---------------------------------------------------------------------------------------------
# restarts


def test_the_state_survives_a_restart_bit_for_bit(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=4, momentum=0.5)
    ef.compress(vec(1), codec, base_version=4, round_=5, rng=rng())
    ef.commit()
    again = feedback(tmp_path)  # a new agent process
    assert (again.state.base_version, again.state.round) == (4, 5)
    assert again.state.residual.tobytes() == ef.state.residual.tobytes()
    assert again.state.velocity.tobytes() == ef.state.velocity.tobytes()
    # the next update from the restarted agent is the one the first would have sent
    a = ef.compress(vec(2), codec, base_version=5, round_=6, rng=rng())
    b = again.compress(vec(2), codec, base_version=5, round_=6, rng=rng())
    assert a == b
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]  # no temporary files


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(p.read_bytes()[:-10]),
        lambda p: p.write_bytes(b"\x81\xa1v\x02"),  # another format version
        lambda p: p.write_bytes(b"\xc7\x03\x2a\x80\x04K"),  # an extension type
        lambda p: p.write_bytes(b"\x93\x01\x02\x03"),
        lambda p: p.write_text("not msgpack at all"),
    ],
)
def test_a_damaged_state_file_is_dropped_with_a_warning(tmp_path, caplog, damage):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=4)
    ef.compress(vec(1), codec, base_version=0, round_=1, rng=rng())
    ef.commit()
    damage(tmp_path / FILE_NAME)
    with caplog.at_level(logging.WARNING):
        again = feedback(tmp_path)
    assert again.state is None
    assert "dropped" in caplog.text or "unreadable" in caplog.text
    again.compress(vec(2), codec, base_version=1, round_=2, rng=rng())  # and it works on


def test_a_state_file_with_nan_is_dropped(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=32)
    ef.compress(vec(1), codec, base_version=0, round_=1, rng=rng())
    ef.state = None
    ef._staged.residual[3] = np.nan
    ef.commit()
    assert feedback(tmp_path).state is None


def test_a_state_file_for_another_model_is_dropped(tmp_path):
    ef = feedback(tmp_path)
    ef.compress(vec(1), TopKCodec(fraction=0.1), base_version=0, round_=1, rng=rng())
    ef.commit()
    assert ErrorFeedback(tmp_path / FILE_NAME, {"w": (10, 20), "b": (10,)}).state is None


# ---------------------------------------------------------------------------------------------
# missed rounds


def held_back(ef: ErrorFeedback, base_version: int, max_staleness: int = 10) -> np.ndarray:
    """What the next update on ``base_version`` sends of an all-zero delta: the residual."""
    codec = TopKCodec(fraction=1.0, bits=32, max_staleness=max_staleness)
    return decoded(
        codec,
        ef.compress(
            np.zeros(N, np.float32), codec, base_version=base_version, round_=99, rng=rng()
        ),
    )


def test_a_device_that_missed_rounds_keeps_its_residual_up_to_max_staleness(tmp_path):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=32, max_staleness=3)
    ef.compress(vec(1), codec, base_version=10, round_=11, rng=rng())
    ef.commit()
    residual = ef.state.residual.copy()
    np.testing.assert_array_equal(held_back(ef, 13, max_staleness=3), residual)  # 3 behind
    assert not held_back(ef, 14, max_staleness=3).any()  # 4 behind: too old, dropped


def test_a_reset_aggregator_drops_the_residual(tmp_path, caplog):
    ef = feedback(tmp_path)
    codec = TopKCodec(fraction=0.1, bits=32)
    ef.compress(vec(1), codec, base_version=10, round_=11, rng=rng())
    ef.commit()
    with caplog.at_level(logging.INFO):
        assert not held_back(ef, 2).any()
    assert "reset" in caplog.text


# ---------------------------------------------------------------------------------------------
# the update encoder


def test_the_encoder_sends_compact_updates_and_keeps_feedback_only_on_commit(tmp_path):
    base = GlobalModel(3, 3, "m", unflatten(vec(9, 0.1), SPEC))
    trained = unflatten(flatten(base.weights, SPEC) + vec(1), SPEC)
    codec = {"name": "topk", "fraction": 0.05, "bits": 4, "momentum": 0.5}
    task = Task(4, 3, 1, 8, 0.1, codec, time.time() + 60)
    enc = UpdateEncoder("dev-1", tmp_path)
    payload = enc.encode(task, base, trained, 33, {"train_s": 0.5})
    assert not (tmp_path / FILE_NAME).exists()
    enc.commit()
    assert (tmp_path / FILE_NAME).exists()
    got = decode_update(payload, topic_device_id="dev-1", spec=SPEC, expect_round=4, expect_base=3)
    assert got.codec == {"name": "topk"} and got.num_samples == 33
    assert np.count_nonzero(flatten(got.delta, SPEC)) == round(0.05 * N)
    # the same task again (a restarted agent redoing its work) encodes the same bytes
    again = UpdateEncoder("dev-1", tmp_path / "other")
    assert again.encode(task, base, trained, 33, {"train_s": 0.5}) == payload


# ---------------------------------------------------------------------------------------------
# the downlink: the aggregator's model is exactly what devices rebuild


class FakeLink:
    packet_limit = None  # no packet limit known: every model goes whole

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []
        self.subscribed: dict[str, object] = {}

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload, retain))

    def subscribe(self, topic: str, handler, qos: int = 1) -> None:
        self.subscribed[topic] = handler

    def unsubscribe(self, topic: str) -> None:
        self.subscribed.pop(topic, None)


TOPICS = Topics("t")


def broadcast(downlink: str, **cfg) -> tuple[ModelBroadcast, FakeLink]:
    link = FakeLink()
    cfg = CodecConfig(downlink=downlink, **cfg)
    return ModelBroadcast(link, TOPICS, "m", SPEC, cfg), link  # type: ignore[arg-type]


def last(link: FakeLink, topic: str) -> bytes:
    return [p for t, p, _ in link.sent if t == topic][-1]


@pytest.mark.parametrize("downlink", ["fp32", "fp16", "int8"])
def test_full_downlinks_give_devices_the_aggregators_model(downlink):
    bc, link = broadcast(downlink)
    bc.publish(unflatten(vec(0, 0.1), SPEC), 0, 0)
    target = unflatten(vec(1, 0.1), SPEC)
    held = bc.prepare(target, 1, 1)
    bc.publish(held, 1, 1)
    payload = last(link, TOPICS.model_global)
    got = decode_model(payload, spec=SPEC, model="m")
    assert weights_digest(got.weights, SPEC) == weights_digest(held, SPEC)
    assert bc.bytes_per_device == len(payload)
    if downlink == "fp32":
        assert weights_digest(held, SPEC) == weights_digest(target, SPEC)
    else:
        assert np.abs(flatten(held, SPEC) - flatten(target, SPEC)).max() < 0.01


def test_the_first_and_a_resumed_model_go_out_exactly_at_fp32():
    bc, link = broadcast("int8")
    weights = unflatten(vec(0, 0.1), SPEC)
    bc.publish(weights, 7, 7)
    got = decode_model(last(link, TOPICS.model_global), spec=SPEC, model="m")
    assert weights_digest(got.weights, SPEC) == weights_digest(weights, SPEC)


def test_delta_downlink_devices_rebuild_the_exact_model():
    bc, link = broadcast("delta")
    held = unflatten(vec(0, 0.1), SPEC)
    bc.publish(held, 0, 0)
    full0 = decode_model(last(link, TOPICS.model_global), spec=SPEC, model="m")
    assert full0.deltas
    device = full0.weights
    for v in range(1, 6):
        change = np.zeros(N, np.float32)
        change[np.random.default_rng(v).choice(N, 20, replace=False)] = 0.01 * v
        agg = bc.prepare(unflatten(flatten(held, SPEC) + change, SPEC), v, v)
        bc.publish(agg, v, v)
        msg = decode_model_delta(last(link, TOPICS.model_delta), spec=SPEC, model="m")
        assert (msg.base, msg.version) == (v - 1, v)
        device = apply_delta(device, msg.delta)
        assert weights_digest(device, SPEC) == weights_digest(agg, SPEC) == msg.target_sha256
        # the retained full model is the same model, for devices that lack the base
        full = decode_model(last(link, TOPICS.model_global), spec=SPEC, model="m")
        assert weights_digest(full.weights, SPEC) == msg.target_sha256 and full.deltas
        assert bc.bytes_per_device == len(last(link, TOPICS.model_delta))
        held = agg
    # 20 changed values of 210: far smaller than the model
    assert bc.bytes_per_device < len(last(link, TOPICS.model_global)) / 2


def test_what_lossy_downlink_leaves_out_is_sent_later():
    bc, _ = broadcast("delta", downlink_bits=8, downlink_block=0)
    start = unflatten(np.zeros(N, np.float32), SPEC)
    bc.publish(start, 0, 0)
    target = vec(3, 0.1)
    held = bc.prepare(unflatten(target, SPEC), 1, 1)
    bc.publish(held, 1, 1)
    first_error = np.abs(flatten(held, SPEC) - target).max()
    assert first_error > 0
    # the server optimiser moves nowhere: the next version still closes the gap
    held = bc.prepare(held, 2, 2)
    assert np.abs(flatten(held, SPEC) - target).max() < first_error / 10


def test_a_republish_sends_the_retained_model_only():
    bc, link = broadcast("delta")
    bc.publish(unflatten(vec(0), SPEC), 0, 0)
    held = bc.prepare(unflatten(vec(1), SPEC), 1, 1)
    bc.publish(held, 1, 1)
    before = len(link.sent)
    bc.publish(held, 1, 1)  # after a reconnect
    assert [t for t, _, _ in link.sent[before:]] == [TOPICS.model_global]


# ---------------------------------------------------------------------------------------------
# the device's side of the downlink


class Device:
    """ModelSync with the agent's callbacks, on a fake link."""

    def __init__(self) -> None:
        self.link = FakeLink()
        self.model: GlobalModel | None = None
        self.rejected: list[str] = []
        self.sync = ModelSync(
            self.link,  # type: ignore[arg-type]
            TOPICS,
            SPEC,
            "m",
            "dev-1",
            held=lambda: self.model,
            adopt=self.adopt,
            reject=self.rejected.append,
            wait_s=0.05,
        )

    def adopt(self, msg: GlobalModel) -> None:
        if self.model is None or msg.version != self.model.version:
            self.model = msg

    def deliver(self, topic: str, payload: bytes) -> None:
        handler = self.link.subscribed.get(topic)
        if handler is not None:
            handler(topic, payload)  # type: ignore[operator]


def test_a_device_follows_deltas_and_leaves_the_full_model_topic():
    bc, agg_link = broadcast("delta")
    dev = Device()
    assert set(dev.link.subscribed) == {TOPICS.model_global, TOPICS.model_delta}
    bc.publish(unflatten(vec(0), SPEC), 0, 0)
    dev.deliver(TOPICS.model_global, last(agg_link, TOPICS.model_global))
    assert dev.model.version == 0
    assert TOPICS.model_global not in dev.link.subscribed  # it follows the deltas now
    for v in (1, 2):
        bc.publish(bc.prepare(unflatten(vec(v), SPEC), v, v), v, v)
        dev.deliver(TOPICS.model_delta, last(agg_link, TOPICS.model_delta))
        assert dev.model.version == v
    dev.deliver(TOPICS.model_delta, last(agg_link, TOPICS.model_delta))  # a redelivery
    assert dev.model.version == 2 and dev.sync.deltas_applied == 2 and dev.sync.full_fetches == 1


def test_a_device_that_missed_a_delta_fetches_the_full_model():
    bc, agg_link = broadcast("delta")
    dev = Device()
    bc.publish(unflatten(vec(0), SPEC), 0, 0)
    dev.deliver(TOPICS.model_global, last(agg_link, TOPICS.model_global))
    for v in (1, 2):
        bc.publish(bc.prepare(unflatten(vec(v), SPEC), v, v), v, v)
    dev.deliver(TOPICS.model_delta, last(agg_link, TOPICS.model_delta))  # v1 -> v2, holds v0
    assert dev.model.version == 0
    assert TOPICS.model_global in dev.link.subscribed  # the broker now sends the retained one
    dev.deliver(TOPICS.model_global, last(agg_link, TOPICS.model_global))
    assert dev.model.version == 2 and dev.sync.full_fetches == 2
    assert TOPICS.model_global not in dev.link.subscribed


def test_a_delta_that_leads_elsewhere_is_refused_and_the_full_model_fetched():
    bc, agg_link = broadcast("delta")
    dev = Device()
    bc.publish(unflatten(vec(0), SPEC), 0, 0)
    dev.deliver(TOPICS.model_global, last(agg_link, TOPICS.model_global))
    # the device's copy of v0 differs from the aggregator's (a bug, a bit flip): the delta
    # would lead to a model the aggregator does not have
    dev.model.weights["b"][0] += 1.0
    bc.publish(bc.prepare(unflatten(vec(1), SPEC), 1, 1), 1, 1)
    dev.deliver(TOPICS.model_delta, last(agg_link, TOPICS.model_delta))
    assert dev.model.version == 0 and dev.rejected == ["delta_mismatch"]
    assert TOPICS.model_global in dev.link.subscribed


def test_a_task_for_a_version_no_delta_brings_fetches_the_full_model():
    dev = Device()
    full = GlobalModel(0, 0, "m", unflatten(vec(0), SPEC), deltas=True)
    dev.deliver(TOPICS.model_global, encode_model(full, DenseCodec()))
    assert TOPICS.model_global not in dev.link.subscribed
    dev.sync.want(5)
    time.sleep(0.3)
    assert TOPICS.model_global in dev.link.subscribed


def test_without_deltas_the_device_stays_on_the_full_model_topic():
    bc, agg_link = broadcast("int8")
    dev = Device()
    bc.publish(unflatten(vec(0), SPEC), 0, 0)
    dev.deliver(TOPICS.model_global, last(agg_link, TOPICS.model_global))
    assert TOPICS.model_global in dev.link.subscribed
    held = bc.prepare(unflatten(vec(1), SPEC), 1, 1)
    bc.publish(held, 1, 1)
    dev.deliver(TOPICS.model_global, last(agg_link, TOPICS.model_global))
    assert weights_digest(dev.model.weights, SPEC) == weights_digest(held, SPEC)


def test_make_codec_is_what_tasks_use():
    assert isinstance(make_codec({"name": "prune", "threshold": 0.0}), PruneCodec)
