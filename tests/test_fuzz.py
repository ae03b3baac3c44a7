"""Fuzzing the aggregator's intake: thousands of random and mutated payloads on the update,
status and telemetry paths. Nothing may raise, and nothing but a valid update may change state.

The handlers are called directly (no broker): what is fuzzed is exactly the code that every
message from MQTT goes through.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.rounds import Round
from aggregator.service import Aggregator
from device.updates import UpdateEncoder
from edgefl.compression import DenseCodec
from edgefl.config import AggregatorConfig, BrokerConfig
from edgefl.messages import (
    FORMAT_VERSION,
    GlobalModel,
    Reply,
    Status,
    Task,
    Telemetry,
    Update,
    encode_compact_update,
)
from tests.conftest import FLEET

pytestmark = pytest.mark.slow

TOPIC = f"edgefl/{FLEET}/devices/dev-a/update"
FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def agg(tmp_path_factory) -> Aggregator:
    cfg = AggregatorConfig(
        fleet=FLEET, broker=BrokerConfig(port=1), state_dir=str(tmp_path_factory.mktemp("fuzz"))
    )
    # every payload must reach the decoders: a quarantined dev-a would be dropped unread
    cfg.quarantine.enabled = False
    return Aggregator(cfg)  # never started: the handlers are driven by hand


@pytest.fixture(scope="module")
def valid(agg: Aggregator, tmp_path_factory) -> list[bytes]:
    """Genuine updates in several codecs, as a device would send them: seeds for mutation."""
    rng = np.random.default_rng(0)
    base = GlobalModel(0, 0, "mlp_digits", {k: v.copy() for k, v in agg.weights.items()})
    trained = {
        k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in agg.weights.items()
    }
    out = []
    for codec in (
        {"name": "dense_fp32"},
        {"name": "fp16"},
        {"name": "topk", "fraction": 0.02, "bits": 4},
    ):
        enc = UpdateEncoder("dev-a", tmp_path_factory.mktemp("ef"))
        task = Task(
            round=1,
            base_version=0,
            epochs=1,
            batch_size=32,
            lr=0.1,
            codec=codec,
            deadline=time.time() + 60,
        )
        out.append(enc.encode(task, base, trained, 50, {"train_s": 0.1, "steps": 3.0}))
    return out


def _fold(agg: Aggregator, payload: bytes) -> tuple[bool, Round]:
    """Fold ``payload`` into a fresh round: accepted and counted once with finite values within
    the magnitude limit, or rejected, counted under a reason, and the round untouched."""
    rnd = Round(1, 0, ["dev-a"], time.time() + 60, agg.spec)
    rejected = sum(agg.rejected.values())
    accepted = agg.intake.fold(TOPIC, payload, rnd)
    if accepted:
        assert rnd.sum.count == 1 and list(rnd.accepted) == ["dev-a"]
        combined = rnd.aggregate()
        assert combined is not None and set(combined) == set(agg.spec)
        limit = agg.cfg.limits.max_delta_abs
        assert all(np.isfinite(v).all() and np.abs(v).max() <= limit for v in combined.values())
        assert sum(agg.rejected.values()) == rejected
    else:
        assert rnd.sum.count == 0 and not rnd.accepted
        assert sum(agg.rejected.values()) == rejected + 1
    return accepted, rnd


def test_the_seeds_are_accepted(agg, valid) -> None:
    for payload in valid:
        assert _fold(agg, payload)[0]


@FUZZ
@given(payload=st.binary(max_size=4096))
def test_random_bytes_are_rejected_and_change_nothing(agg, payload) -> None:
    rejected = sum(agg.rejected.values())
    accepted, _ = _fold(agg, payload)
    assert not accepted
    assert sum(agg.rejected.values()) == rejected + 1  # counted, with a reason


@FUZZ
@given(data=st.data())
def test_mutated_updates_never_escape_validation(agg, valid, data) -> None:
    payload = bytearray(data.draw(st.sampled_from(valid)))
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
        at = data.draw(st.integers(0, max(0, len(payload) - 1)))
        if kind == "flip" and payload:
            payload[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del payload[at : at + data.draw(st.integers(1, 64))]
        elif kind == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            payload[at : at + 4] = data.draw(st.binary(min_size=4, max_size=4))
    _fold(agg, bytes(payload))  # either rejected and unchanged, or a valid finite update


@FUZZ
@given(
    payload=st.one_of(
        st.binary(max_size=2048),
        st.builds(lambda s: s.encode(), st.text(max_size=300)),
        st.just(Status("online", telemetry=Telemetry(1.0, 100.0, 5)).to_payload()),
    )
)
def test_status_and_telemetry_paths_never_raise(agg, payload) -> None:
    agg.intake.status(f"edgefl/{FLEET}/devices/dev-a/status", payload)
    agg.intake.telemetry(f"edgefl/{FLEET}/devices/dev-a/telemetry", payload)


# -- every handler, then a checkpoint: nothing a device says may make the state unsavable -------

# JSON as an attacker writes it: integers past 64 bits, floats at the edges, deep nesting, lone
# surrogates and control characters in strings, long lists
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=80),
    st.just("\ud800"),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=40,
)


@FUZZ
@given(data=st.data())
def test_every_handler_then_a_checkpoint(agg, data) -> None:
    """Statuses, telemetry and replies with any field replaced by anything JSON can carry (or
    an extra field added), through their handlers as MQTT delivers them; then the checkpoint
    that every round writes must still encode."""
    birth = json.loads(
        Status("online", "0.1.0", {"samples": 10, "machine": "aarch64"},
               Telemetry(1.0, 100.0, 5)).to_payload()
    )
    telemetry = json.loads(Telemetry(1.0, 100.0, 5).to_payload())
    reply = json.loads(Reply("dev-a", 1, "declined", "battery", {"cpu_s": 0.1}).to_payload())
    for message in (birth, birth["capabilities"], telemetry, reply, reply["metrics"]):
        key = data.draw(st.sampled_from([*message, "extra"]))
        message[key] = data.draw(JSON_VALUES)
    try:
        payloads = [json.dumps(m).encode("utf-8", "surrogatepass") for m in (birth, telemetry,
                                                                             reply)]
    except ValueError:
        return
    devices = f"edgefl/{FLEET}/devices/dev-a/"
    agg.intake.status(devices + "status", payloads[0])
    agg.intake.telemetry(devices + "telemetry", payloads[1])
    agg.intake.reply(devices + "reply", payloads[2])
    agg._checkpoint()  # raises if anything stored cannot be encoded
    rec = agg.registry.get("dev-a")
    if rec is not None:
        json.dumps(rec.capabilities)  # only plain, bounded values were kept
        assert all(isinstance(k, str) for k in rec.capabilities)


def test_the_reported_birth_is_rejected_and_counted(agg) -> None:
    """The attack that once stopped training: an integer beyond 64 bits in the capabilities."""
    before = agg.guard.rejected["status/malformed"]
    birth = {"v": FORMAT_VERSION, "state": "online", "capabilities": {"samples": 10**30}}
    agg.intake.status(f"edgefl/{FLEET}/devices/dev-z/status", json.dumps(birth).encode())
    assert agg.guard.rejected["status/malformed"] == before + 1
    assert agg.registry.get("dev-z") is None
    agg._checkpoint()


# -- finite but absurd: the magnitude limit, and the last check before a model is published ---


def _update(agg: Aggregator, value: float) -> bytes:
    """A well-formed dense update that moves one weight by ``value`` and nothing else."""
    delta = {k: np.zeros_like(v) for k, v in agg.weights.items()}
    first = next(iter(delta))
    delta[first].flat[0] = value
    update = Update("dev-a", 1, 0, 50, delta, {"train_s": 0.1})
    return encode_compact_update(update, DenseCodec(), agg.spec)


def test_a_value_beyond_max_delta_abs_is_rejected_as_magnitude(agg) -> None:
    limit = agg.cfg.limits.max_delta_abs
    before = agg.rejected["magnitude"]
    accepted, _ = _fold(agg, _update(agg, 100 * limit))  # finite, so no NaN/Inf check catches it
    assert not accepted
    assert agg.rejected["magnitude"] == before + 1  # counted, under its reason
    # the same update within the limit is taken: it is the value that is refused, nothing else
    assert _fold(agg, _update(agg, -0.5 * limit))[0]


# numpy warns of the overflow that this test provokes on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_round_that_would_make_the_model_non_finite_is_discarded(tmp_path, caplog) -> None:
    cfg = AggregatorConfig(fleet=FLEET, broker=BrokerConfig(port=1), state_dir=str(tmp_path))
    # with the magnitude limit lifted to what float32 holds, every finite update is accepted,
    # and a server step larger than 1 carries one past float32's range: this is what the
    # check before publishing is for
    cfg.limits.max_delta_abs = float(np.finfo(np.float32).max)
    cfg.strategy.server_lr = 10.0
    agg = Aggregator(cfg)
    before = {k: v.copy() for k, v in agg.weights.items()}
    rnd = Round(1, 0, ["dev-a"], time.time() + 60, agg.spec)
    assert agg.intake.fold(TOPIC, _update(agg, 1e38), rnd)
    with caplog.at_level(logging.ERROR, logger="aggregator.service"):
        metrics = agg._wait_and_close(rnd, time.perf_counter(), 0, None)
    assert metrics.reported == 1 and not metrics.applied
    assert agg.version == 0 and agg.next_round == 2  # the round is over, the model as it was
    for k, w in before.items():
        np.testing.assert_array_equal(agg.weights[k], w)
    assert "non-finite" in caplog.text
    agg.checkpointer.wait_flushed()
    saved = agg.checkpointer.load()
    assert saved["version"] == 0 and all(np.isfinite(w).all() for w in saved["weights"].values())
