"""The wire format (edgefl/messages/, edgefl/compression/): every message round-trips, and
every way a hostile payload can be wrong is refused with WireError and the right reason code.

No broker here: these tests call the codec directly, which is the one place messages are checked.
"""

from __future__ import annotations

import hashlib
import json

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.compression import CODECS, DenseCodec, DenseFp16Codec, WireError, make_codec
from edgefl.messages import (
    COMPACT_MAGIC,
    FORMAT_VERSION,
    MAX_CONTROL_BYTES,
    AggregatorStatus,
    Deployment,
    GlobalModel,
    ModelDelta,
    Reply,
    Status,
    Task,
    Telemetry,
    Update,
    decode_model,
    decode_model_delta,
    decode_update,
    encode_compact_update,
    encode_model,
    encode_model_delta,
)

# A small model: four tensors, 50 values. Order matters (it is the state_dict order).
SPEC = {"fc1.weight": (4, 3), "fc1.bias": (4,), "fc2.weight": (2, 4), "fc2.bias": (2,)}
NUM_VALUES = sum(int(np.prod(s)) for s in SPEC.values())
DEVICE = "dev-7"
ROUND, BASE, SAMPLES = 3, 2, 57
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None)
# the update envelope's array, by position (edgefl/messages/update.py); "extra" is optional
FIELDS = ("device", "round", "base", "n", "tag", "codec", "metrics", "tensors", "extra")
# without zstd, so that tests can read and rewrite the envelope's body
PLAIN = DenseCodec(zstd=False)


def make_delta(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SPEC.items()}


def make_update(**changes) -> Update:
    fields = dict(
        device_id=DEVICE,
        round=ROUND,
        base_version=BASE,
        num_samples=SAMPLES,
        delta=make_delta(),
        metrics={"loss": 0.25, "accuracy": 0.875},
    )
    fields.update(changes)
    return Update(**fields)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def envelope(codec=None, **changes) -> bytes:
    return encode_compact_update(make_update(**changes), codec or PLAIN, SPEC)


def envelope_fields() -> dict:
    """The fields of the valid envelope, by name."""
    payload = envelope()
    assert payload[:2] == bytes([COMPACT_MAGIC, FORMAT_VERSION])  # no zstd frame
    return dict(zip(FIELDS, msgpack.unpackb(payload[2:], raw=False), strict=False))


def repack(fields: dict) -> bytes:
    """The envelope of ``fields`` in their positions; a field left out shifts those after it,
    as a sender that forgot one would."""
    body = pack([fields[k] for k in FIELDS if k in fields])
    return bytes([COMPACT_MAGIC, FORMAT_VERSION]) + body


def with_fields(**changes) -> bytes:
    """The valid envelope with any fields replaced by any values."""
    return repack(envelope_fields() | changes)


def without(key: str) -> bytes:
    fields = envelope_fields()
    del fields[key]
    return repack(fields)


def with_tensors(edit) -> bytes:
    """The valid envelope with its tensor records passed through ``edit(records) -> records``."""
    fields = envelope_fields()
    fields["tensors"] = edit(fields["tensors"])
    return repack(fields)


def decode(payload, **kw) -> Update:
    args = dict(topic_device_id=DEVICE, spec=SPEC, expect_round=ROUND, expect_base=BASE)
    args.update(kw)
    return decode_update(payload, **args)


def rejected(payload, reason: str, **kw) -> WireError:
    with pytest.raises(WireError) as info:
        decode(payload, **kw)
    assert info.value.reason == reason, str(info.value)
    return info.value


# ---------------------------------------------------------------------------------------------
# the update envelope: round trips


@pytest.mark.parametrize("codec", [PLAIN, DenseCodec()], ids=["plain", "zstd"])
def test_update_round_trip_keeps_every_field(codec):
    sent = make_update()
    got = decode(encode_compact_update(sent, codec, SPEC))
    assert got.device_id == DEVICE
    assert got.round == ROUND
    assert got.base_version == BASE
    assert got.num_samples == SAMPLES
    assert got.metrics == {"loss": 0.25, "accuracy": 0.875}
    assert got.codec == {"name": "dense_fp32"}
    assert list(got.delta) == list(SPEC)  # same names, same order
    for name, shape in SPEC.items():
        assert got.delta[name].dtype == np.float32
        assert got.delta[name].shape == shape
        np.testing.assert_array_equal(got.delta[name], sent.delta[name])


def test_decoded_delta_is_writable_and_independent_of_the_payload():
    payload = envelope()
    got = decode(payload)
    got.delta["fc1.bias"] += 1.0  # frombuffer views are read-only; the codec must copy
    np.testing.assert_array_equal(decode(payload).delta["fc1.bias"], make_delta()["fc1.bias"])


def test_update_without_round_and_base_expectations_accepts_any():
    got = decode(envelope(round=11, base_version=9), expect_round=None, expect_base=None)
    assert (got.round, got.base_version) == (11, 9)


def test_update_metrics_are_optional():
    assert decode(envelope(metrics={})).metrics == {}
    assert decode(with_fields(metrics=b"\x00\x00")).metrics == {}


def test_update_integer_metric_becomes_float():
    got = decode(envelope(metrics={"steps": 45, "energy_j": 3}))
    assert got.metrics == {"steps": 45.0, "energy_j": 3.0}
    assert all(isinstance(v, float) for v in got.metrics.values())


def test_update_size_is_the_tensors_plus_a_small_header():
    size = len(envelope())
    assert 4 * NUM_VALUES < size < 4 * NUM_VALUES + 400


def test_update_with_the_real_model_spec():
    from edgefl.models import build_model, get_weights, model_spec

    model = build_model("mlp_digits", seed=0)
    spec = model_spec(model)
    delta = {k: w * np.float32(0.01) for k, w in get_weights(model).items()}
    payload = encode_compact_update(make_update(delta=delta), DenseCodec(), spec)
    got = decode(payload, spec=spec)
    for k in spec:
        np.testing.assert_array_equal(got.delta[k], delta[k])


def test_precoded_records_are_used_as_given():
    codec = DenseCodec()
    records = codec.encode(make_delta(seed=5))
    got = decode(encode_compact_update(make_update(), codec, SPEC, records))
    np.testing.assert_array_equal(got.delta["fc2.weight"], make_delta(seed=5)["fc2.weight"])


def test_fp16_round_trip_within_half_precision():
    sent = make_delta(seed=1, scale=10.0)
    sent["fc2.bias"] = np.array([65504.0, -1e-6], dtype=np.float32)  # fp16 max, a subnormal
    payload = envelope(codec=DenseFp16Codec(zstd=False), delta=sent)
    got = decode(payload)
    assert got.codec == {"name": "fp16"}
    for k in SPEC:
        assert got.delta[k].dtype == np.float32
        # round to nearest: relative error at most 2**-11, absolute at most 2**-25 near zero
        np.testing.assert_allclose(got.delta[k], sent[k], rtol=2**-11, atol=2**-24)
        np.testing.assert_array_equal(got.delta[k], sent[k].astype(np.float16).astype(np.float32))
    assert not np.array_equal(got.delta["fc1.weight"], sent["fc1.weight"])  # really fp16
    assert len(payload) < len(envelope(delta=sent)) - 2 * NUM_VALUES + 20


@pytest.mark.parametrize("value", [65520.0, 1e5, -7e4, 3.4e38])
def test_fp16_refuses_values_that_overflow(value):
    delta = make_delta()
    delta["fc1.bias"][2] = value
    with pytest.raises(ValueError, match="fp16"):
        DenseFp16Codec().encode(delta)


def test_fp16_decode_refuses_infinity():
    delta = make_delta()
    records = DenseFp16Codec().encode(delta)
    bits = np.frombuffer(records[0]["data"], dtype="<f2").copy()
    bits[0] = np.inf
    records[0]["data"] = bits.tobytes()
    payload = encode_compact_update(make_update(), DenseFp16Codec(), SPEC, records)
    rejected(payload, "nonfinite")


def test_make_codec_by_name_and_spec():
    assert isinstance(make_codec("fp16"), DenseFp16Codec)
    assert isinstance(make_codec({"name": "dense_fp32"}), DenseCodec)
    for name, cls in CODECS.items():
        spec = cls().spec()
        assert spec == {"name": name} | {p: getattr(cls(), p) for p in cls.PARAMS}
        assert make_codec(spec, complete=True).spec() == spec


def test_a_codec_from_the_wire_must_give_every_parameter():
    spec = make_codec({"name": "topk", "fraction": 0.02}).spec()
    assert spec["fraction"] == 0.02 and "bits" in spec and "zstd" in spec  # defaults written out
    for param in ("fraction", "bits", "zstd"):
        partial = {k: v for k, v in spec.items() if k != param}
        make_codec(partial)  # configuration may leave it to the defaults ...
        with pytest.raises(WireError, match=param) as info:
            make_codec(partial, complete=True)  # ... a task or model from the wire may not
        assert info.value.reason == "codec"


# ---------------------------------------------------------------------------------------------
# the update envelope: hostile payloads


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_are_malformed(seed):
    data = np.random.default_rng(seed).bytes(int(64 + 100 * seed))
    rejected(data, "malformed")


def test_empty_payload_is_malformed():
    rejected(b"", "malformed")


def test_payload_that_is_not_bytes_is_malformed():
    rejected(envelope().decode("latin-1"), "malformed")


def test_every_truncation_of_a_valid_envelope_is_malformed():
    payload = envelope()
    decode(payload)  # the whole thing is fine
    wrong = []
    for cut in range(len(payload)):
        try:
            decode(payload[:cut])
            wrong.append((cut, "accepted"))
        except WireError as e:
            if e.reason != "malformed":
                wrong.append((cut, e.reason))
    assert not wrong, f"truncations not refused as malformed: {wrong[:10]}"


def test_trailing_bytes_are_malformed():
    rejected(envelope() + b"\x00", "malformed")


@pytest.mark.parametrize("obj", [{"device": DEVICE}, 42, "edgefl.update", b"bytes", None, 1.5])
def test_body_that_is_not_an_array_is_malformed(obj):
    rejected(bytes([COMPACT_MAGIC, FORMAT_VERSION]) + pack(obj), "malformed")


def test_non_string_map_keys_are_malformed():
    rejected(with_fields(extra={7: 1.0}), "malformed")
    rejected(with_fields(extra={b"loss": 1.0}), "malformed")


@pytest.mark.parametrize("first", [0x80, 0x8A, 0xC0, 0xC2, 0x00, 0xFF, ord("{")])
def test_a_payload_that_is_not_an_update_envelope_is_malformed(first):
    err = rejected(bytes([first]) + envelope()[1:], "malformed")
    assert "not an update envelope" in str(err)


def test_the_superseded_map_envelope_is_refused_with_a_reason():
    # what the aggregator also accepted until now: a MessagePack map with named fields
    old = pack(
        {"fmt": "edgefl.update", "v": 1, "device": DEVICE, "round": ROUND, "base": BASE,
         "n": SAMPLES, "metrics": {}, "codec": {"name": "dense_fp32"},
         "tensors": PLAIN.encode(make_delta())}
    )
    err = rejected(old, "malformed")
    assert "not an update envelope" in str(err) and "0xc1" in str(err)


def test_missing_magic_is_malformed():
    rejected(envelope()[1:], "malformed")
    rejected(envelope()[2:], "malformed")


@pytest.mark.parametrize("version", [0, 1, FORMAT_VERSION + 1, 15])
def test_unknown_format_version(version):
    payload = envelope()
    err = rejected(payload[:1] + bytes([version]) + payload[2:], "version")
    assert f"reads {FORMAT_VERSION}" in str(err)


def test_device_in_envelope_differs_from_topic():
    err = rejected(envelope(device_id="dev-8"), "device_mismatch")
    assert "dev-8" in str(err) and DEVICE in str(err)


@pytest.mark.parametrize(
    "device", ["Dev-7", "dev/7", "dev+", "dev#", "", "a" * 65, "dev 7", "dév", "dev-7\n"]
)
def test_invalid_device_id_is_malformed(device):
    # even when the topic (were it possible) said the same thing
    rejected(with_fields(device=device), "malformed", topic_device_id=device)


def test_wrong_round():
    rejected(envelope(round=ROUND + 1), "round")
    rejected(envelope(round=ROUND - 1), "round")


def test_wrong_base_version():
    rejected(envelope(base_version=BASE + 1), "base_version")


@pytest.mark.parametrize("key", FIELDS[:-1])
def test_missing_field(key):
    rejected(without(key), "malformed")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("round", True),
        ("round", "3"),
        ("round", 3.0),
        ("round", None),
        ("base", False),
        ("base", "2"),
        ("n", True),
        ("n", "57"),
        ("n", 57.0),
        ("n", [57]),
        ("device", 7),
        ("device", b"dev-7"),
        ("tag", True),
        ("tag", "tag"),
        ("tag", -1),
        ("tag", 1 << 16),
        ("metrics", []),
        ("metrics", "loss"),
        ("metrics", None),
        ("metrics", b"\x00"),
        ("metrics", b"\x00\x80"),  # a metric the table does not have
        ("metrics", b"\x01\x00"),  # train_s, but no value
        ("metrics", b"\x00\x00\x00"),  # a byte left over
        ("extra", []),
        ("extra", "loss"),
        ("extra", {"loss": "low"}),
        ("extra", {"loss": True}),
        ("extra", {"loss": None}),
        ("extra", {"loss": float("nan")}),
        ("extra", {"loss": float("inf")}),
        ("extra", {"loss": -1.0}),  # outside its range
        ("extra", {"x" * 65: 1.0}),
        ("extra", {f"m{i}": 1.0 for i in range(33)}),
    ],
)
def test_wrong_type_or_value_is_malformed(key, value):
    rejected(with_fields(**{key: value}), "malformed")


def test_more_metrics_than_allowed_in_table_and_map_together_is_malformed():
    # the valid envelope has two in its table; the map may add thirty, no more
    assert len(decode(with_fields(extra={f"m{i}": 1.0 for i in range(30)})).metrics) == 32
    rejected(with_fields(extra={f"m{i}": 1.0 for i in range(31)}), "malformed")


def test_bool_round_is_refused_even_when_it_equals_the_expected_round():
    rejected(with_fields(round=True), "malformed", expect_round=1)


@pytest.mark.parametrize("n", [0, -1, -(2**40)])
def test_non_positive_sample_count_is_malformed(n):
    rejected(with_fields(n=n), "malformed")


def test_sample_count_above_the_limit_is_malformed():
    decode(with_fields(n=1000), max_samples=1000)
    rejected(with_fields(n=1001), "malformed", max_samples=1000)


@pytest.mark.parametrize("key", ["round", "base"])
def test_negative_round_or_base_is_malformed(key):
    rejected(with_fields(**{key: -1}), "malformed", expect_round=None, expect_base=None)


def test_update_for_another_model():
    other = {"fc1.weight": (3, 4), "fc1.bias": (4,), "fc2.weight": (2, 4), "fc2.bias": (2,)}
    rejected(envelope(), "shape", spec=other)
    rejected(with_fields(tag=envelope_fields()["tag"] ^ 1), "shape")

def test_too_few_tensors():
    rejected(with_tensors(lambda r: r[:-1]), "tensor_count")


def test_too_many_tensors():
    rejected(with_tensors(lambda r: r + [r[-1]]), "tensor_count")


def test_no_tensors():
    rejected(with_tensors(lambda r: []), "tensor_count")


@pytest.mark.parametrize("tensors", [{"fc1.weight": b""}, "tensors", None, 4])
def test_tensors_not_a_list_is_malformed(tensors):
    rejected(with_fields(tensors=tensors), "malformed")


def test_tensor_record_not_a_map_is_malformed():
    rejected(with_tensors(lambda r: [r[0], r[1], r[2], [r[3]["name"], r[3]["data"]]]), "malformed")


def test_tensors_in_the_wrong_order():
    def swap(r):
        r[0], r[1] = r[1], r[0]
        return r

    err = rejected(with_tensors(swap), "tensor_name")
    assert "fc1.weight" in str(err)


def test_tensor_with_the_wrong_name():
    def rename(r):
        r[2]["name"] = "fc3.weight"
        return r

    rejected(with_tensors(rename), "tensor_name")


def test_tensor_without_a_name():
    def unname(r):
        del r[1]["name"]
        return r

    rejected(with_tensors(unname), "tensor_name")


@pytest.mark.parametrize("shape", [[3, 4], [12], [4, 3, 1], [], "4x3", None, [4, -3]])
def test_tensor_with_the_wrong_shape(shape):
    def reshape(r):
        r[0]["shape"] = shape
        return r

    rejected(with_tensors(reshape), "shape")


@pytest.mark.parametrize("change", [-4, -1, 1, 4, 400])
def test_data_length_not_matching_the_shape(change):
    def resize(r):
        data = r[1]["data"]
        r[1]["data"] = data[:change] if change < 0 else data + b"\x00" * change
        return r

    rejected(with_tensors(resize), "size")


@pytest.mark.parametrize("data", [None, "0000", [0.0] * 4, 0])
def test_data_that_is_not_bytes_is_malformed(data):
    def replace(r):
        r[1]["data"] = data
        return r

    rejected(with_tensors(replace), "malformed")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tensor", list(SPEC))
def test_nan_and_inf_are_refused(bad, tensor):
    delta = make_delta()
    delta[tensor].flat[-1] = bad
    rejected(envelope(delta=delta), "nonfinite")


@pytest.mark.parametrize("codec", [99, 5, -1, True, 1.5, "dense_fp32", None, [0], {"name": 0}])
def test_unknown_codec(codec):
    rejected(with_fields(codec=codec), "codec")


def test_fp32_data_labelled_fp16_is_refused():
    rejected(with_fields(codec=DenseFp16Codec.wire_id), "size")


def test_records_labelled_as_a_packed_codec_are_refused():
    rejected(with_fields(codec=CODECS["topk"].wire_id), "malformed")


def test_payload_over_max_bytes():
    payload = envelope()
    decode(payload, max_bytes=len(payload))
    err = rejected(payload, "too_large", max_bytes=len(payload) - 1)
    assert str(len(payload)) in str(err)


def test_huge_payload_is_refused_before_parsing():
    rejected(b"\x00" * (9 << 20), "too_large")


@pytest.mark.parametrize("where", ["top", "field", "metric", "record", "data", "whole"])
def test_msgpack_extension_types_are_refused(where):
    ext = msgpack.ExtType(42, b"\x80\x04K\x01.")  # a pickle of 1 inside; never to be looked at
    fields = envelope_fields()
    body = None
    if where == "top":
        body = pack([*fields.values(), {}, ext])
    elif where == "field":
        fields["round"] = ext
    elif where == "metric":
        fields["extra"] = {"loss": ext}
    elif where == "record":
        fields["tensors"][0]["extra"] = ext
    elif where == "data":
        fields["tensors"][0]["data"] = ext
    else:
        body = pack(ext)
    payload = repack(fields) if body is None else bytes([COMPACT_MAGIC, FORMAT_VERSION]) + body
    err = rejected(payload, "malformed")
    assert "extension type" in str(err)


@pytest.mark.parametrize("where", ["round", "extra"])
def test_msgpack_timestamp_extension_is_refused(where):
    # type -1 is decoded by msgpack itself, not by ext_hook; it must still be refused
    stamp = msgpack.Timestamp(1_700_000_000, 0)
    value = stamp if where == "round" else {"t": stamp}
    err = rejected(with_fields(**{where: value}), "malformed")
    assert "extension type" in str(err)


# Values a hostile or broken sender might put in any field.
HOSTILE_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    float("nan"),
    float("-inf"),
    "",
    "x" * 300,
    "dense_fp32",
    b"\xff\x00",
    [],
    [None],
    [1, "a"],
    {},
    {"name": "dense_fp32"},
    {"name": 1},
    {b"k": 1},
]


def test_any_field_set_to_any_value_gives_an_update_or_a_wire_error():
    for key in FIELDS:
        for value in HOSTILE_VALUES:
            try:
                decode(with_fields(**{key: value}))
            except WireError:
                pass
            except Exception as e:  # noqa: BLE001 - any other exception is the failure
                pytest.fail(f"{key}={value!r} raised {type(e).__name__}: {e}")
    for i in range(len(SPEC)):
        for field in ("name", "shape", "data"):
            for value in HOSTILE_VALUES:
                fields = envelope_fields()
                fields["tensors"][i][field] = value
                try:
                    decode(repack(fields))
                except WireError:
                    pass
                except Exception as e:  # noqa: BLE001
                    pytest.fail(f"tensors[{i}].{field}={value!r} raised {type(e).__name__}: {e}")


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_update_on_arbitrary_bytes_raises_only_wire_error(data):
    with pytest.raises(WireError):
        decode(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_update_on_an_arbitrary_body_raises_only_wire_error(body):
    with pytest.raises(WireError):
        decode(bytes([COMPACT_MAGIC, FORMAT_VERSION]) + body)


_VALID = envelope()


@FUZZ
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255))
def test_decode_update_on_a_mutated_envelope_gives_an_update_or_a_wire_error(pos, byte):
    data = bytearray(_VALID)
    data[pos] = byte
    try:
        got = decode(bytes(data))
    except WireError:
        return
    # a mutation that survives must still give a fully valid update
    assert got.device_id == DEVICE and got.num_samples >= 1
    assert all(np.isfinite(a).all() and a.shape == SPEC[k] for k, a in got.delta.items())


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(FIELDS), _MSGPACK_VALUES)
def test_decode_update_with_an_arbitrary_field_raises_only_wire_error(key, value):
    try:
        decode(with_fields(**{key: value}))
    except WireError:
        pass


# ---------------------------------------------------------------------------------------------
# the global model


def make_global(**changes) -> GlobalModel:
    fields = dict(version=5, round=4, model="mlp_digits", weights=make_delta(seed=9))
    fields.update(changes)
    return GlobalModel(**fields)


def model_obj(payload: bytes) -> dict:
    return msgpack.unpackb(payload, raw=False)


def model_rejected(payload, reason: str, **kw) -> WireError:
    args = dict(spec=SPEC, model="mlp_digits")
    args.update(kw)
    with pytest.raises(WireError) as info:
        decode_model(payload, **args)
    assert info.value.reason == reason, str(info.value)
    return info.value


def with_body(obj: dict, body: bytes, fix_digest: bool = True) -> bytes:
    obj["body"] = body
    if fix_digest:
        obj["sha256"] = hashlib.sha256(body).hexdigest()
    return pack(obj)


@pytest.mark.parametrize("codec", [DenseCodec(), DenseFp16Codec()], ids=["fp32", "fp16"])
def test_model_round_trip(codec):
    sent = make_global()
    payload = encode_model(sent, codec)
    assert len(sent.sha256) == 64  # encode fills it in
    got = decode_model(payload, spec=SPEC, model="mlp_digits")
    assert (got.version, got.round, got.model) == (5, 4, "mlp_digits")
    assert got.sha256 == sent.sha256 == hashlib.sha256(model_obj(payload)["body"]).hexdigest()
    assert list(got.weights) == list(SPEC)
    for k in SPEC:
        expected = sent.weights[k]
        if isinstance(codec, DenseFp16Codec):
            expected = expected.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got.weights[k], expected)


def test_model_with_a_wrong_sha256():
    obj = model_obj(encode_model(make_global(), DenseCodec()))
    obj["sha256"] = "0" * 64
    model_rejected(pack(obj), "checksum")


def test_model_with_a_corrupted_body():
    obj = model_obj(encode_model(make_global(), DenseCodec()))
    body = bytearray(obj["body"])
    body[-1] ^= 0x01
    model_rejected(with_body(obj, bytes(body), fix_digest=False), "checksum")


def test_model_for_another_model_name():
    payload = encode_model(make_global(model="mlp_mnist"), DenseCodec())
    err = model_rejected(payload, "model")
    assert "mlp_mnist" in str(err)


def test_update_envelope_is_not_a_model():
    model_rejected(envelope(), "malformed")


def test_model_with_an_unknown_version():
    obj = model_obj(encode_model(make_global(), DenseCodec()))
    obj["v"] = FORMAT_VERSION + 1
    model_rejected(pack(obj), "version")


@pytest.mark.parametrize(("key", "value"), [("version", -1), ("round", True), ("model", 3)])
def test_model_with_a_bad_field(key, value):
    obj = model_obj(encode_model(make_global(), DenseCodec()))
    obj[key] = value
    model_rejected(pack(obj), "malformed")


@pytest.mark.parametrize("key", ["body", "sha256", "version"])
def test_model_with_a_missing_field(key):
    obj = model_obj(encode_model(make_global(), DenseCodec()))
    del obj[key]
    model_rejected(pack(obj), "malformed")


def test_model_body_that_is_not_a_list():
    obj = model_obj(encode_model(make_global(), DenseCodec()))
    model_rejected(with_body(obj, pack({"fc1.weight": b""})), "malformed")


def test_model_body_that_is_not_msgpack():
    obj = model_obj(encode_model(make_global(), DenseCodec()))
    model_rejected(with_body(obj, b"\xc1\xc1\xc1"), "malformed")


def test_model_body_with_an_extension_type():
    obj = model_obj(encode_model(make_global(), DenseCodec()))
    model_rejected(with_body(obj, pack([msgpack.ExtType(1, b"")])), "malformed")


def test_model_with_weights_of_the_wrong_shape():
    other = {"fc1.weight": (3, 4), "fc1.bias": (4,), "fc2.weight": (2, 4), "fc2.bias": (2,)}
    payload = encode_model(make_global(), DenseCodec())
    model_rejected(payload, "shape", spec=other)


def test_model_with_nan_weights():
    weights = make_delta(seed=9)
    weights["fc2.bias"][0] = np.nan
    model_rejected(encode_model(make_global(weights=weights), DenseCodec()), "nonfinite")


def test_model_over_max_bytes():
    payload = encode_model(make_global(), DenseCodec())
    model_rejected(payload, "too_large", max_bytes=len(payload) - 1)


# ---------------------------------------------------------------------------------------------
# control messages (JSON)


def make_task(**changes) -> Task:
    fields = dict(
        round=4,
        base_version=3,
        epochs=5,
        batch_size=32,
        lr=0.1,
        codec={"name": "fp16"},
        deadline=1_700_000_123.25,
        max_steps=40,
        issued=1_700_000_000.5,
    )
    fields.update(changes)
    return Task(**fields)


def make_telemetry(**changes) -> Telemetry:
    fields = dict(
        cpu_percent=37.5,
        mem_available_mb=812.25,
        samples=143,
        battery_percent=64.0,
        charging=False,
        temperature_c=51.5,
        link_kbps=2400.0,
        agent_cpu_percent=12.5,
        agent_rss_mb=141.75,
        ts=1_700_000_001.0,
    )
    fields.update(changes)
    return Telemetry(**fields)


def edit_json(payload: bytes, **changes) -> bytes:
    obj = json.loads(payload)
    obj.update(changes)
    return json.dumps(obj).encode()


def json_rejected(cls, payload, reason: str) -> WireError:
    with pytest.raises(WireError) as info:
        cls.from_payload(payload)
    assert info.value.reason == reason, str(info.value)
    return info.value


def test_task_round_trip():
    sent = make_task()
    assert Task.from_payload(sent.to_payload()) == sent


@pytest.mark.parametrize("field", ["max_steps", "prox_mu", "codec", "personal"])
def test_a_task_gives_every_field(field):
    # a task means what its sender meant: no field is left to the receiver's defaults
    obj = json.loads(make_task().to_payload())
    del obj[field]
    with pytest.raises(WireError):
        Task.from_payload(json.dumps(obj).encode())


def test_a_task_writes_out_its_codecs_defaults():
    obj = json.loads(make_task(codec={"name": "topk", "fraction": 0.02}).to_payload())
    assert obj["codec"] == make_codec({"name": "topk", "fraction": 0.02}).spec()
    assert {"bits", "block", "momentum", "zstd"} <= set(obj["codec"])


def test_task_payload_is_readable_json():
    obj = json.loads(make_task().to_payload())
    assert obj["v"] == FORMAT_VERSION and obj["round"] == 4
    assert obj["codec"] == {"name": "fp16", "zstd": True}


@pytest.mark.parametrize(
    "version", [1, FORMAT_VERSION + 1, str(FORMAT_VERSION), float(FORMAT_VERSION), None]
)
def test_task_with_an_unknown_version(version):
    json_rejected(Task, edit_json(make_task().to_payload(), v=version), "version")


def test_task_with_an_unknown_codec():
    json_rejected(Task, edit_json(make_task().to_payload(), codec={"name": "zstd"}), "codec")


def test_a_task_with_a_codec_given_by_name_alone_is_refused():
    # the parameters would be the receiver's defaults, not necessarily the sender's
    json_rejected(Task, edit_json(make_task().to_payload(), codec="fp16"), "codec")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", -0.1),
        ("lr", 1000.0),
        ("lr", True),
        ("lr", "0.1"),
        ("epochs", 1001),
        ("epochs", 2.0),
        ("batch_size", 0),
        ("round", -1),
        ("deadline", None),
        ("max_steps", -1),
        ("issued", "now"),
    ],
)
def test_task_with_a_bad_field(key, value):
    json_rejected(Task, edit_json(make_task().to_payload(), **{key: value}), "malformed")


@pytest.mark.parametrize(
    "telemetry",
    [make_telemetry(), Telemetry(cpu_percent=0, mem_available_mb=64, samples=0, ts=5.0)],
    ids=["full", "no-battery"],
)
def test_telemetry_round_trip(telemetry):
    got = Telemetry.from_payload(telemetry.to_payload())
    assert got == telemetry
    assert isinstance(got.cpu_percent, float)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cpu_percent", -1),
        ("battery_percent", 101),
        ("charging", "yes"),
        ("charging", 1),
        ("samples", 1.5),
        ("samples", -3),
        ("temperature_c", 1000),
        ("mem_available_mb", None),
        ("agent_cpu_percent", -0.5),
        ("agent_cpu_percent", "busy"),
        ("agent_rss_mb", 1e10),
        ("agent_rss_mb", True),
    ],
)
def test_telemetry_with_a_bad_field(key, value):
    json_rejected(Telemetry, edit_json(make_telemetry().to_payload(), **{key: value}), "malformed")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400, "1e400"])
@pytest.mark.parametrize(
    "key", ["cpu_percent", "battery_percent", "temperature_c", "agent_cpu_percent", "ts"]
)
def test_telemetry_refuses_non_finite_numbers(key, literal):
    payload = make_telemetry().to_payload().decode()
    obj = json.loads(payload)
    old = f'"{key}":{json.dumps(obj[key])}'
    assert old in payload
    payload = payload.replace(old, f'"{key}":{literal}')
    json_rejected(Telemetry, payload.encode(), "malformed")


def test_status_birth_round_trip():
    sent = Status(
        state="online",
        agent_version="0.1.0",
        capabilities={"machine": "aarch64", "cpu_count": 4, "codecs": ["dense_fp32", "fp16"]},
        telemetry=make_telemetry(),
        serving=3,
        serving_accuracy=0.9375,
        ts=1_700_000_002.0,
    )
    got = Status.from_payload(sent.to_payload())
    assert got == sent
    assert isinstance(got.telemetry, Telemetry)


def test_status_will_is_a_bare_offline():
    got = Status.from_payload(b'{"v":%d,"state":"offline"}' % FORMAT_VERSION)
    assert got.state == "offline" and got.telemetry is None and got.serving is None


@pytest.mark.parametrize(
    "change",
    [
        {"state": "dead"},
        {"state": None},
        {"capabilities": ["x"]},
        {"agent_version": 1},
        {"telemetry": "fine"},
        {"telemetry": {"cpu_percent": 1}},
        {"serving": -1},
        {"serving": True},
        {"serving_accuracy": 1.5},
    ],
)
def test_status_with_a_bad_field(change):
    sent = Status(state="online", telemetry=make_telemetry(), serving=1, ts=1.0)
    json_rejected(Status, edit_json(sent.to_payload(), **change), "malformed")


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v":%d,"state":"online","serving_accuracy":NaN}' % FORMAT_VERSION,
        b'{"v":%d,"state":"online","serving_accuracy":Infinity}' % FORMAT_VERSION,
        b'{"v":%d,"state":"online","ts":-Infinity}' % FORMAT_VERSION,
        b'{"v":%d,"state":"online","telemetry":{"cpu_percent":NaN,"mem_available_mb":1,'
        b'"samples":1,"ts":1}}' % FORMAT_VERSION,
    ],
)
def test_status_refuses_non_finite_numbers(payload):
    json_rejected(Status, payload, "malformed")


@pytest.mark.parametrize(
    "sent",
    [
        AggregatorStatus("online", round=7, model_version=7, reported=12, expected=20, ts=9.0),
        AggregatorStatus("finished", round=30, model_version=30, accuracy=0.96875, ts=9.0),
        AggregatorStatus("offline", ts=0.0),
        AggregatorStatus(
            "online", round=3, model_version=2, reported=1, expected=3, mode="async", rounds=10,
            waiting_for="updates", deadline=1_700_000_100.5, missing=["dev-1", "dev-2"],
            missing_more=5, online=3, uplink_bytes=123456, downlink_bytes=654321,
            rejected={"stale": 2, "not_participant": 1},
            devices={"dev-0": {"rounds": 2, "assigned": 3, "rejected": 1}}, devices_more=4,
            ts=9.0,
        ),
    ],
    ids=lambda s: f"{s.state}-{s.mode}",
)
def test_aggregator_status_round_trip(sent):
    assert AggregatorStatus.from_payload(sent.to_payload()) == sent


@pytest.mark.parametrize(
    "payload",
    [
        b'"state":"paused"',
        b'"state":"online","round":-1',
        b'"state":"online","round":"7"',
        b'"state":"online","accuracy":1.01',
        b'"state":"online","accuracy":NaN',
        b'"state":"online","accuracy":-Infinity',
        b'"state":"online","quarantined":["dev/1"]',
        b'"state":"online","mode":"batch"',
        b'"state":"online","waiting_for":"godot"',
        b'"state":"online","deadline":Infinity',
        b'"state":"online","missing":["a","b/c"]',
        b'"state":"online","missing":[' + b",".join([b'"d"'] * 65) + b"]",
        b'"state":"online","rejected":{"Stale!":1}',
        b'"state":"online","rejected":{"stale":-1}',
        b'"state":"online","rejected":[1]',
        b'"state":"online","devices":{"dev-0":{"rounds":1,"energy":2}}',
        b'"state":"online","devices":{"dev-0":{"rounds":1.5}}',
        b'"state":"online","devices":{"dev/0":{}}',
        b'"state":"online","devices":{"dev-0":[]}',
        b'"state":"online","online":true',
    ],
)
def test_aggregator_status_with_a_bad_field(payload):
    json_rejected(AggregatorStatus, b'{"v":%d,' % FORMAT_VERSION + payload + b"}", "malformed")


CONTROL = [Task, Telemetry, Status, AggregatorStatus]


@pytest.mark.parametrize("cls", CONTROL, ids=lambda c: c.__name__)
def test_oversized_control_message(cls):
    payload = b'{"state":"online","agent_version":"' + b"x" * MAX_CONTROL_BYTES + b'"}'
    json_rejected(cls, payload, "too_large")


@pytest.mark.parametrize("cls", CONTROL, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"not json", b"[1, 2]", b'"online"', b"null", b"\xff\xfe{}", b"[" * 60000],
    ids=["empty", "truncated", "text", "list", "string", "null", "bad-utf8", "deep"],
)
def test_control_message_that_is_not_a_json_object(cls, payload):
    json_rejected(cls, payload, "malformed")


def _valid_control_payloads() -> list[tuple[type, bytes]]:
    return [
        (Task, make_task().to_payload()),
        (Telemetry, make_telemetry().to_payload()),
        (Status, Status("online", telemetry=make_telemetry(), serving=2, ts=1.0).to_payload()),
        (AggregatorStatus, AggregatorStatus("online", round=2, accuracy=0.5).to_payload()),
    ]


def test_any_control_field_set_to_any_value_gives_a_message_or_a_wire_error():
    json_values = [v for v in HOSTILE_VALUES if not isinstance(v, bytes)]
    json_values = [v for v in json_values if not (isinstance(v, dict) and b"k" in v)]
    for cls, payload in _valid_control_payloads():
        for key in json.loads(payload):
            for value in json_values:
                bad = edit_json(payload, **{key: value})
                try:
                    cls.from_payload(bad)
                except WireError:
                    pass
                except Exception as e:  # noqa: BLE001
                    pytest.fail(f"{cls.__name__} {key}={value!r}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# the format version: one check, every decoder


def _previous_version_payloads() -> dict[str, tuple]:
    """For each decoder: a call with ``(version)`` that decodes a valid message carrying the
    given version (None: no version at all)."""

    def json_with(payload: bytes, version) -> bytes:
        obj = json.loads(payload)
        obj.pop("v")
        return json.dumps(obj if version is None else obj | {"v": version}).encode()

    def msgpack_with(payload: bytes, version) -> bytes:
        obj = msgpack.unpackb(payload, raw=False)
        obj.pop("v")
        return pack(obj if version is None else obj | {"v": version})

    model = encode_model(make_global(), DenseCodec())
    delta = encode_model_delta(ModelDelta(6, 5, 5, "mlp_digits", make_delta(), "a" * 64), PLAIN)
    deployment = Deployment(3, 3, "mlp_digits", "fp32", "b" * 64, 10, 10, 1, 1).to_payload()
    reply = Reply(DEVICE, 3, "late").to_payload()
    telemetry = make_telemetry().to_payload()
    return {
        "update": lambda v: decode(envelope()[:1] + bytes([v or 0]) + envelope()[2:]),
        "model": lambda v: decode_model(msgpack_with(model, v), spec=SPEC, model="mlp_digits"),
        "delta": lambda v: decode_model_delta(
            msgpack_with(delta, v), spec=SPEC, model="mlp_digits"
        ),
        "task": lambda v: Task.from_payload(json_with(make_task().to_payload(), v)),
        "telemetry": lambda v: Telemetry.from_payload(json_with(telemetry, v)),
        "status": lambda v: Status.from_payload(json_with(Status("offline").to_payload(), v)),
        "aggregator status": lambda v: AggregatorStatus.from_payload(
            json_with(AggregatorStatus("online").to_payload(), v)
        ),
        "reply": lambda v: Reply.from_payload(json_with(reply, v), topic_device_id=DEVICE),
        "deployment": lambda v: Deployment.from_payload(
            json_with(deployment, v), model="mlp_digits"
        ),
    }


@pytest.mark.parametrize("kind", list(_previous_version_payloads()))
def test_every_decoder_reads_this_version_and_refuses_any_other(kind):
    call = _previous_version_payloads()[kind]
    call(FORMAT_VERSION)  # the same message in this version decodes
    for version in (None, 1, FORMAT_VERSION + 1):  # 1: the previous format
        with pytest.raises(WireError) as info:
            call(version)
        assert info.value.reason == "version", f"{kind} v{version}: {info.value}"
        assert f"reads {FORMAT_VERSION}" in str(info.value)


def test_the_largest_aggregator_status_fits_one_control_message():
    from edgefl.messages.control import (
        MAX_STATUS_DEVICES,
        MAX_STATUS_MISSING,
        MAX_STATUS_REASONS,
    )

    def ids(n: int, tag: str) -> list[str]:
        return [f"{tag}{i:05d}".ljust(64, "x") for i in range(n)]

    big = 2**53
    sent = AggregatorStatus(
        "online", round=big, model_version=big, reported=big, expected=big, accuracy=0.123456789,
        quarantined=ids(8, "q"), mode="async", rounds=big, waiting_for="updates",
        deadline=1e10 + 0.123456, missing=ids(MAX_STATUS_MISSING, "m"), missing_more=big,
        online=big, uplink_bytes=big, downlink_bytes=big,
        rejected=dict.fromkeys(ids(MAX_STATUS_REASONS, "r"), big),
        devices={d: {"rounds": big, "assigned": big, "rejected": big}
                 for d in ids(MAX_STATUS_DEVICES, "d")},
        devices_more=big, ts=1e10,
    )
    payload = sent.to_payload()
    assert len(payload) <= MAX_CONTROL_BYTES
    assert AggregatorStatus.from_payload(payload) == sent
    one_more = json.loads(payload)
    one_more["devices"]["z" * 64] = {"rounds": 1}
    json_rejected(AggregatorStatus, json.dumps(one_more).encode(), "malformed")
