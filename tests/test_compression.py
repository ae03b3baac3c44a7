"""The compressing codecs (edgefl/compression/), the compact update envelope and the model delta
(edgefl/messages/): what they keep, that both ends decode the same values, and that every
inconsistent payload is refused with WireError and a reason that says what is wrong.

No broker here; tests/test_compression_fleet.py runs the codecs over MQTT.
"""

from __future__ import annotations

import math
import time

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.compression import (
    CODECS,
    DenseCodec,
    DenseFp16Codec,
    Int8Codec,
    PackedCodec,
    PruneCodec,
    TopKCodec,
    WireError,
    codec_from_config,
    flatten,
    indices,
    make_codec,
    num_values,
    quantize,
    spec_tag,
    unflatten,
)
from edgefl.compression.frame import compress_if_smaller, decompress
from edgefl.compression.sparse import unpack_values
from edgefl.config import CodecConfig, ConfigError
from edgefl.messages import (
    COMPACT_MAGIC,
    FORMAT_VERSION,
    ModelDelta,
    Update,
    apply_delta,
    decode_model_delta,
    decode_update,
    encode_compact_update,
    encode_model_delta,
    weights_digest,
)

# the B1 model's layout: 9,610 values in four tensors
SPEC = {"0.weight": (128, 64), "0.bias": (128,), "2.weight": (10, 128), "2.bias": (10,)}
N = num_values(SPEC)
DEVICE = "dev-07"
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def delta_flat(seed: int = 0, scale: float = 0.01) -> np.ndarray:
    return (rng(seed).standard_normal(N) * scale).astype(np.float32)


def packed(codec: PackedCodec, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    return codec.compress(delta_flat(seed), SPEC, rng(seed))


def refused(data, reason: str) -> WireError:
    with pytest.raises(WireError) as info:
        unpack_values(data, SPEC)
    assert info.value.reason == reason, str(info.value)
    return info.value


# ---------------------------------------------------------------------------------------------
# what each codec keeps, and that the receiver decodes exactly what the sender accounted for


CODEC_CASES = [
    {"name": "int8"},
    {"name": "int8", "block": 64},
    {"name": "prune", "threshold": 0.02},
    {"name": "prune", "threshold": 0.0, "bits": 4, "block": 100},
    *[{"name": "topk", "fraction": f, "bits": b} for f in (0.1, 0.01, 0.001) for b in (2, 4, 8)],
    {"name": "topk", "fraction": 0.05, "bits": 16},
    {"name": "topk", "fraction": 0.05, "bits": 32},
    {"name": "topk", "fraction": 0.3, "bits": 8, "block": 7},
    {"name": "topk", "fraction": 1.0, "bits": 4},
]


@pytest.mark.parametrize("spec", CODEC_CASES, ids=lambda s: "-".join(map(str, s.values())))
def test_decoding_gives_exactly_the_values_the_encoder_accounted_for(spec):
    codec = make_codec(spec)
    payload, idx, sent = packed(codec)
    got = flatten(codec.decode(payload, SPEC), SPEC)
    expected = np.zeros(N, dtype=np.float32)
    expected[idx] = sent
    # bit for bit: error feedback and the downlink delta rely on it
    assert got.tobytes() == expected.tobytes()
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [0, 32])
def test_quantisation_error_is_within_one_step_of_its_group(bits, block):
    codec = TopKCodec(fraction=0.2, bits=bits, block=block)
    flat = delta_flat(1)
    _, idx, sent = codec.compress(flat, SPEC, rng(1))
    starts = quantize.group_starts(idx, block, np.array([0, 8192, 8320, 9600, 9610]))
    peak = np.maximum.reduceat(np.abs(flat[idx]), starts)
    step = np.repeat(2 * peak / (2**bits - 1), np.diff(np.append(starts, len(idx))))
    assert np.all(np.abs(sent - flat[idx]) <= step * 1.001 + 1e-7)


def test_stochastic_rounding_is_unbiased():
    values = np.array([0.3, -0.71, 0.05, 1.0, -1.0, 0.999], dtype=np.float32)
    starts = np.array([0])
    scales, _ = quantize.scales_for(values, starts)
    draws = np.stack(
        [
            quantize.dequantize(
                quantize.quantize(values, starts, scales, 2, rng(i)), starts, scales, 2
            )
            for i in range(4000)
        ]
    )
    # four levels over [-1, 1]: a step of 2/3, so one draw errs by up to 0.67; the mean of
    # 4000 is within about 5 standard errors of the value
    assert np.all(np.abs(draws.mean(axis=0) - values) < 0.03)
    assert len(np.unique(draws)) == 4  # every code is used


def test_topk_keeps_the_largest_magnitudes_across_tensors():
    flat = np.zeros(N, dtype=np.float32)
    flat[[3, 8200, 9000, 9605]] = [0.5, -0.9, 0.01, 0.7]
    _, idx, _ = TopKCodec(fraction=3 / N, bits=32).compress(flat, SPEC, rng())
    assert idx.tolist() == [3, 8200, 9605]  # one from three different tensors


def test_prune_keeps_every_value_at_or_above_the_threshold():
    flat = delta_flat(2)
    _, idx, sent = PruneCodec(threshold=0.015, bits=32).compress(flat, SPEC, rng())
    assert idx.tolist() == np.flatnonzero(np.abs(flat) >= 0.015).tolist()
    np.testing.assert_array_equal(sent, flat[idx])


def test_topk_warm_up_falls_by_four_each_round_to_the_target():
    codec = TopKCodec(fraction=0.01, warmup_rounds=4)
    assert [codec.fraction_at(r) for r in (1, 2, 3, 4, 5, None)] == [
        0.25,
        0.0625,
        0.015625,
        0.01,
        0.01,
        0.01,
    ]
    flat = delta_flat()
    assert len(codec.positions(flat, 1)) == round(0.25 * N)
    assert len(codec.positions(flat, 9)) == round(0.01 * N)


def test_sizes_at_high_compression():
    # top-1 % at 2 bits with one scale: 96 positions in about 8 bits each, 24 bytes of levels
    payload, idx, _ = packed(TopKCodec(fraction=0.01, bits=2, block=128))
    assert len(idx) == 96
    assert len(payload) < 130
    # int8: a quarter of fp32 plus the scales
    payload, _, _ = packed(Int8Codec(block=64))
    assert N < len(payload) < N + 2 * (N // 64 + 1) + 8


def test_fp16_values_that_do_not_fit_are_refused_at_the_sender():
    flat = delta_flat()
    flat[5] = 1e6
    with pytest.raises(ValueError, match="fp16"):
        TopKCodec(fraction=0.01, bits=16).compress(flat, SPEC, rng())


def test_scales_above_fp16_range_go_as_fp32():
    flat = delta_flat()
    flat[5] = 1e6
    payload, idx, sent = TopKCodec(fraction=0.01, bits=8).compress(flat, SPEC, rng())
    assert payload[0] & 0x20
    _, values = unpack_values(payload, SPEC)
    np.testing.assert_array_equal(values, sent)


def test_an_all_zero_group_decodes_to_zeros():
    flat = np.zeros(N, dtype=np.float32)
    payload, _, sent = Int8Codec().compress(flat, SPEC, rng())
    assert not sent.any()
    assert not flatten(Int8Codec().decode(payload, SPEC), SPEC).any()


# ---------------------------------------------------------------------------------------------
# index coding


@pytest.mark.parametrize("k", [0, 1, 10, 96, 961, 4000, N - 1])
def test_each_index_coding_round_trips_and_the_smallest_is_chosen(k):
    idx = np.sort(rng(k).choice(N, size=k, replace=False)).astype(np.int64)
    coding, data = indices.encode(idx, N)
    got, end = indices.decode(coding, data, 0, k, N)
    assert end == len(data)
    np.testing.assert_array_equal(got, idx)
    g = indices.gaps(idx)
    candidates = [len(indices._varint_bytes(g))]
    if k:
        candidates += [(N + 7) // 8, len(indices._rice_bytes(g, indices._best_rice_parameter(g)))]
    assert len(data) == min(candidates)


def test_sparse_positions_use_rice_and_dense_ones_a_bitmap():
    sparse = np.sort(rng().choice(N, size=96, replace=False))
    assert indices.encode(sparse, N)[0] == indices.RICE
    dense = np.sort(rng().choice(N, size=4000, replace=False))
    assert indices.encode(dense, N)[0] == indices.BITMAP
    assert indices.encode(np.arange(N), N) == (indices.ALL, b"")


@pytest.mark.parametrize("coding", [indices.VARINT, indices.RICE])
def test_gap_codings_decode_when_written_by_hand(coding):
    idx = np.array([0, 1, 5, 200, 9609])
    data = (
        indices._varint_bytes(indices.gaps(idx))
        if coding == indices.VARINT
        else indices._rice_bytes(indices.gaps(idx), 3)
    )
    got, _ = indices.decode(coding, data, 0, len(idx), N)
    np.testing.assert_array_equal(got, idx)


# ---------------------------------------------------------------------------------------------
# hostile packed payloads: every inconsistency has its reason


def header(bits_code: int, coding: int, k: int, block: int | None = 0, flags: int = 0) -> bytes:
    out = bytes([bits_code | coding << 3 | flags]) + indices._varint_bytes(np.array([k]))
    if block is not None:
        out += indices._varint_bytes(np.array([block]))
    return out


def fp32_payload(idx: list[int], coding: int = indices.VARINT) -> bytes:
    """A valid payload of fp32 values 1.0 at ``idx`` in the given coding."""
    g = indices.gaps(np.array(idx))
    body = {
        indices.VARINT: lambda: indices._varint_bytes(g),
        indices.RICE: lambda: indices._rice_bytes(g, 2),
    }[coding]()
    return header(4, coding, len(idx), None) + body + np.ones(len(idx), "<f4").tobytes()


def test_a_hand_made_payload_is_accepted():
    idx, values = unpack_values(fp32_payload([2, 7, 9000]), SPEC)
    assert idx.tolist() == [2, 7, 9000] and values.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("coding", [indices.VARINT, indices.RICE])
def test_index_out_of_range(coding):
    err = refused(fp32_payload([2, 7, N], coding), "index_range")
    assert str(N) in str(err)
    refused(fp32_payload([N + 1000], coding), "index_range")


def test_bitmap_bits_beyond_the_model_are_out_of_range():
    bitmap = bytearray((N + 7) // 8)
    bitmap[0] = 0x80
    bitmap[-1] = 0x01  # the last padding bit: position N + 5
    payload = header(4, indices.BITMAP, 2, None) + bytes(bitmap) + np.ones(2, "<f4").tobytes()
    refused(payload, "index_range")


@pytest.mark.parametrize("coding", [indices.VARINT, indices.RICE])
def test_indices_not_increasing(coding):
    # a gap of 0 is a repeated position; gaps cannot go backwards, so that is the only way
    g = np.array([3, 4, 0, 2])
    body = indices._varint_bytes(g) if coding == indices.VARINT else indices._rice_bytes(g, 1)
    payload = header(4, coding, 4, None) + body + np.ones(4, "<f4").tobytes()
    err = refused(payload, "index_order")
    assert "increasing" in str(err)


def test_count_disagrees_with_the_bitmap():
    bitmap = np.zeros(N, dtype=np.uint8)
    bitmap[[1, 2, 3]] = 1
    body = np.packbits(bitmap).tobytes()
    refused(header(4, indices.BITMAP, 4, None) + body + np.ones(4, "<f4").tobytes(), "count")
    refused(header(4, indices.BITMAP, 2, None) + body + np.ones(2, "<f4").tobytes(), "count")


@pytest.mark.parametrize("coding", [indices.VARINT, indices.RICE])
def test_count_larger_than_the_positions_present(coding):
    # positions 0..7: eight gaps of 1, which fill two bytes exactly as Rice codes with r = 0
    g = indices.gaps(np.arange(8))
    body = indices._varint_bytes(g) if coding == indices.VARINT else indices._rice_bytes(g, 0)
    # the header says 9 values; the positions that follow are 8, and nothing after them
    err = refused(header(4, coding, 9, None) + body, "count")
    assert "9" in str(err)


def test_count_larger_than_the_model():
    refused(header(4, indices.VARINT, N + 1, None), "count")


def test_dense_coding_with_the_wrong_count():
    refused(header(2, indices.ALL, N - 1, 0) + b"\x00" * 4000, "count")


def test_values_that_disagree_with_the_count():
    good = fp32_payload([2, 7, 9000])
    refused(good[:-4], "size")
    refused(good + b"\x00\x00\x00\x00", "size")
    payload, _, _ = packed(TopKCodec(fraction=0.01, bits=4))
    refused(payload[:-1], "size")
    refused(payload + b"\x00", "size")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -0.5])
def test_bad_scales_are_refused(bad):
    payload, idx, _ = packed(TopKCodec(fraction=0.01, bits=8))  # per tensor: 4 scales
    k = len(idx)
    index_end = len(payload) - k - 4 * 2
    scales = np.frombuffer(payload, "<f2", 4, index_end).copy()
    scales[1] = bad
    forged = payload[:index_end] + scales.tobytes() + payload[index_end + 8 :]
    err = refused(forged, "scale")
    assert ("NaN" in str(err)) or ("negative" in str(err))


@pytest.mark.parametrize("code", [5, 6, 7])
def test_unsupported_bit_widths_are_refused(code):
    err = refused(header(code, indices.VARINT, 0, 0), "bits")
    assert "2, 4, 8" in str(err)


@pytest.mark.parametrize("bits", [0, 1, 3, 5, 6, 7, 12, 64, True, 8.0, "8"])
def test_a_codec_spec_with_an_unsupported_bit_width_is_refused(bits):
    err = refused_spec({"name": "topk", "bits": bits})
    assert "bits" in str(err)


def refused_spec(spec) -> WireError:
    with pytest.raises(WireError) as info:
        make_codec(spec)
    assert info.value.reason == "codec"
    return info.value


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "topk", "fraction": 0},
        {"name": "topk", "fraction": 1.5},
        {"name": "topk", "fraction": float("nan")},
        {"name": "topk", "warmup_rounds": -1},
        {"name": "prune", "threshold": -0.1},
        {"name": "int8", "block": -1},
        {"name": "int8", "bits": 4},  # int8 is 8 bits by name
        {"name": "topk", "momentum": 1.0},
        {"name": "topk", "clip": -1.0},
        {"name": "topk", "max_staleness": 0},
        {"name": "topk", "error_feedback": 1},
        {"name": "dense_fp32", "zstd": "yes"},
        {"name": "topk", "nonsense": 1},
    ],
)
def test_bad_codec_parameters_are_refused(spec):
    refused_spec(spec)


def test_reserved_flag_bits_are_refused():
    refused(bytes([0x40]) + header(4, indices.VARINT, 0, None)[1:], "malformed")
    refused(header(4, indices.VARINT, 0, None, flags=0x20), "malformed")  # fp32 scales, no scales


def test_non_zero_padding_is_refused():
    payload, _, _ = packed(TopKCodec(fraction=0.01, bits=2, block=128))  # 96 levels: no padding
    payload, _, _ = packed(TopKCodec(fraction=0.0101, bits=2, block=128))  # 97: 6 bits of padding
    refused(payload[:-1] + bytes([payload[-1] | 0x01]), "malformed")


@pytest.mark.parametrize("data", [b"", None, [1, 2], "bytes", 7])
def test_empty_or_non_bytes_payloads_are_refused(data):
    with pytest.raises(WireError):
        unpack_values(data, SPEC)


def test_nan_in_fp16_values_is_refused():
    payload, idx, _ = packed(TopKCodec(fraction=0.01, bits=16))
    values = np.frombuffer(payload[-2 * len(idx) :], "<f2").copy()
    values[3] = np.nan
    refused(payload[: -2 * len(idx)] + values.tobytes(), "nonfinite")


def test_a_varint_that_never_ends_is_refused():
    refused(bytes([4 | indices.VARINT << 3]) + b"\xff" * 12, "malformed")


# ---------------------------------------------------------------------------------------------
# fuzzing: only WireError may come out of the decoders


_VALID = {
    spec["name"] + str(i): packed(make_codec(spec), i)[0]
    for i, spec in enumerate(
        [
            {"name": "topk", "fraction": 0.01, "bits": 4},  # Rice
            {"name": "topk", "fraction": 0.005, "bits": 2, "block": 16},
            {"name": "topk", "fraction": 0.2, "bits": 8},  # bitmap
            {"name": "prune", "threshold": 0.03, "bits": 16},  # varint or Rice
            {"name": "int8", "block": 64},  # all
        ]
    )
}
_SMALL = {"a": (3, 5), "b": (7,)}  # a small model, so that random bytes reach deep


def _decodes_or_wire_error(data, spec) -> None:
    try:
        idx, values = unpack_values(data, spec)
    except WireError:
        return
    n = num_values(spec)
    assert len(idx) == len(values) <= n
    assert (np.diff(idx) > 0).all() and (len(idx) == 0 or idx[0] >= 0 and idx[-1] < n)
    assert np.isfinite(values).all()


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_into_the_packed_decoder(data):
    _decodes_or_wire_error(data, SPEC)
    _decodes_or_wire_error(data, _SMALL)


@FUZZ
@given(st.sampled_from(sorted(_VALID)), st.data())
def test_mutated_packed_payloads(which, data):
    payload = bytearray(_VALID[which])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    _decodes_or_wire_error(
        bytes(payload[:cut]) if data.draw(st.booleans()) else bytes(payload), SPEC
    )


@FUZZ
@given(
    st.integers(0, 255),
    st.integers(0, 2 * 9610),
    st.integers(0, 300),
    st.binary(max_size=200),
)
def test_forged_headers_with_random_bodies(flags, k, block, body):
    data = bytes([flags]) + indices._varint_bytes(np.array([k, block])) + body
    _decodes_or_wire_error(data, SPEC)
    _decodes_or_wire_error(data, _SMALL)


# ---------------------------------------------------------------------------------------------
# zstd frames


def test_zstd_is_kept_only_where_it_pays():
    assert compress_if_smaller(bytes(1000)) is not None
    assert compress_if_smaller(rng().bytes(300)) is None
    assert compress_if_smaller(b"tiny") is None


def test_a_frame_that_decompresses_past_the_limit_is_refused():
    bomb = zstandard.ZstdCompressor().compress(bytes(50 << 20))  # 50 MiB of zeros, ~2 KB
    assert len(bomb) < 4096
    with pytest.raises(WireError) as info:
        decompress(bomb, 1 << 20)
    assert info.value.reason == "too_large"


def test_a_frame_that_lies_about_its_size_is_refused_without_inflating():
    frame = bytearray(zstandard.ZstdCompressor().compress(bytes(50 << 20)))
    # the frame header's content size (4 bytes after magic, descriptor, window) says 100
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == 50 << 20
    frame[6:10] = (100).to_bytes(4, "little")
    with pytest.raises(WireError) as info:
        decompress(bytes(frame), 1 << 20)
    assert info.value.reason == "malformed"


def test_a_frame_without_its_size_or_with_trailing_bytes_is_refused():
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000))
    with pytest.raises(WireError, match="state its size"):
        decompress(no_size, 1 << 20)
    frame = zstandard.ZstdCompressor().compress(bytes(1000))
    assert decompress(frame, 1000) == bytes(1000)
    for bad in (frame + b"\x00", frame[:-1], b"\x28\xb5\x2f\xfd", b"not zstd at all"):
        with pytest.raises(WireError) as info:
            decompress(bad, 1 << 20)
        assert info.value.reason == "malformed"


# ---------------------------------------------------------------------------------------------
# the compact update envelope


METRICS = {
    "loss": 0.3125,
    "accuracy": 0.875,
    "train_s": 0.0937,
    "cpu_s": 0.0911,
    "steps": 15.0,
    "samples_seen": 360.0,
}


def now_metrics() -> dict[str, float]:
    t = time.time()
    return {**METRICS, "t_task": t - 0.2, "t_start": t - 0.15, "t_end": t - 0.0563}


def compact(codec=None, *, metrics=None, device=DEVICE, rnd=3, base=2, n=57, data=None) -> bytes:
    codec = codec or TopKCodec(fraction=0.01, bits=4)
    if data is None and isinstance(codec, PackedCodec):
        data = packed(codec)[0]
    update = Update(device, rnd, base, n, unflatten(delta_flat(), SPEC), metrics or now_metrics())
    return encode_compact_update(update, codec, SPEC, data)


def decode(payload, **kw):
    args = dict(topic_device_id=DEVICE, spec=SPEC, expect_round=3, expect_base=2)
    args.update(kw)
    return decode_update(payload, **args)


def rejected(payload, reason: str, **kw) -> WireError:
    with pytest.raises(WireError) as info:
        decode(payload, **kw)
    assert info.value.reason == reason, str(info.value)
    return info.value


def test_compact_envelope_round_trip():
    sent = now_metrics()
    codec = TopKCodec(fraction=0.01, bits=4)
    data, idx, values = packed(codec)
    payload = compact(codec, metrics=sent, data=data)
    assert payload[0] == COMPACT_MAGIC
    got = decode(payload)
    assert (got.device_id, got.round, got.base_version, got.num_samples) == (DEVICE, 3, 2, 57)
    assert got.codec == {"name": "topk"}
    flat = flatten(got.delta, SPEC)
    assert np.flatnonzero(flat).tolist() == idx.tolist()
    np.testing.assert_array_equal(flat[idx], values)
    assert set(got.metrics) == set(sent)
    for key in ("loss", "accuracy"):  # fp16
        assert got.metrics[key] == pytest.approx(sent[key], rel=1e-3)
    for key in ("train_s", "cpu_s"):  # fp32
        assert got.metrics[key] == pytest.approx(sent[key], rel=1e-6)
    assert got.metrics["steps"] == 15.0 and got.metrics["samples_seen"] == 360.0
    for key in ("t_task", "t_start", "t_end"):  # unix times, to within microseconds
        assert abs(got.metrics[key] - sent[key]) < 1e-5


def test_compact_envelope_overhead_is_small():
    data, _, _ = packed(TopKCodec(fraction=0.01, bits=2, block=128))
    payload = compact(data=data)
    # device id, round, base, samples, model tag, codec, nine metrics with unix times
    assert len(payload) - len(data) <= 56


def test_metrics_outside_the_table_or_its_types_travel_in_a_map():
    sent = {**now_metrics(), "energy_j": 1.25, "steps": 15.5, "loss": 1e6}
    got = decode(compact(metrics=sent)).metrics
    assert got["energy_j"] == 1.25 and got["steps"] == 15.5 and got["loss"] == 1e6


def test_times_are_placed_near_the_receivers_clock_across_the_32_bit_wrap():
    # 2**32 ms is 49.7 days: a unix time whose milliseconds are just below a multiple of it
    t = (math.floor(time.time() * 1000 / 2**32) * 2**32 - 5) / 1000
    payload = compact(metrics={"t_task": t, "t_end": t + 0.02})
    got = decode_update(payload, topic_device_id=DEVICE, spec=SPEC)
    assert abs(got.metrics["t_task"] - t) < 1e-5
    assert abs(got.metrics["t_end"] - (t + 0.02)) < 1e-5


@pytest.mark.parametrize("codec", [DenseCodec(), DenseFp16Codec(), Int8Codec(block=64)])
def test_compact_envelope_carries_every_codec(codec):
    got = decode(compact(codec))
    assert got.codec == {"name": codec.name}
    assert flatten(got.delta, SPEC).shape == (N,)


def test_zstd_is_used_for_a_dense_update_only_when_allowed():
    # B1's deltas hold many exact zeros (inputs that are always 0 give zero gradients)
    delta = delta_flat()
    delta[: 64 * 40] = 0.0
    update = Update(DEVICE, 3, 2, 57, unflatten(delta, SPEC), now_metrics())
    zipped = encode_compact_update(update, DenseCodec(), SPEC)
    plain = encode_compact_update(update, DenseCodec(zstd=False), SPEC)
    assert zipped[1] & 0x10 and not plain[1] & 0x10
    assert len(zipped) < 0.9 * len(plain)
    np.testing.assert_array_equal(flatten(decode(zipped).delta, SPEC), delta)
    np.testing.assert_array_equal(flatten(decode(plain).delta, SPEC), delta)


def test_a_compact_update_that_decompresses_past_the_limit_is_refused():
    body = msgpack.packb([DEVICE, 3, 2, 57, spec_tag(SPEC), 0, b"\x00\x00", bytes(20 << 20)])
    frame = zstandard.ZstdCompressor().compress(body)
    payload = bytes([COMPACT_MAGIC, 0x10 | FORMAT_VERSION]) + frame
    assert len(payload) < 30_000
    err = rejected(payload, "too_large", max_bytes=1 << 20)
    assert "decompresses" in str(err)


def test_compact_envelope_field_checks():
    rejected(compact(device="dev-8"), "device_mismatch")
    rejected(compact(rnd=4), "round")
    rejected(compact(base=1), "base_version")
    rejected(compact(n=0), "malformed")
    other = {**SPEC, "2.bias": (1, 10)}  # same number of values, another shape
    rejected(compact(), "shape", spec=other)
    payload = compact()
    rejected(payload, "too_large", max_bytes=len(payload) - 1)
    rejected(payload[:2], "malformed")
    rejected(payload[:-3], "malformed")  # truncated MessagePack


@pytest.mark.parametrize("flags", [0x00, 0x01, 0x03, 0x0F, 0x21, 0x81])
def test_compact_envelope_version_and_flags(flags):
    payload = compact()
    reason = "malformed" if flags & 0xE0 else "version"
    rejected(payload[:1] + bytes([flags]) + payload[2:], reason)


def _fields(payload: bytes) -> list:
    assert payload[1] == FORMAT_VERSION  # not compressed
    return msgpack.unpackb(payload[2:], raw=False)


def _repack(fields: list) -> bytes:
    return bytes([COMPACT_MAGIC, FORMAT_VERSION]) + msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    ("index", "value", "reason"),
    [
        (0, 7, "malformed"),
        (1, -1, "malformed"),
        (3, True, "malformed"),
        (4, 70000, "malformed"),
        (5, 99, "codec"),
        (5, True, "codec"),
        (5, "topk", "codec"),
        (5, [4], "codec"),  # unhashable: once a TypeError out of the decoder
        (5, {"name": "topk"}, "codec"),
        (6, b"\x00", "malformed"),
        (6, b"\xff\xff", "malformed"),
        (6, "metrics", "malformed"),
        (7, [1, 2], "malformed"),
        (7, None, "malformed"),
    ],
)
def test_compact_envelope_with_a_bad_field(index, value, reason):
    fields = _fields(compact())
    fields[index] = value
    rejected(_repack(fields), reason)


def test_compact_envelope_with_the_wrong_number_of_fields():
    fields = _fields(compact())
    rejected(_repack(fields[:7]), "malformed")
    rejected(_repack([*fields, {}, 1]), "malformed")
    rejected(_repack({"device": DEVICE}), "malformed")  # a map is not an array


def test_compact_metrics_that_are_not_finite_are_refused():
    fields = _fields(compact(metrics={"train_s": 0.5}))
    blob = bytearray(fields[6])
    blob[2:6] = np.array([np.inf], "<f4").tobytes()
    fields[6] = bytes(blob)
    rejected(_repack(fields), "malformed")
    fields[6] = bytes(blob[:4])
    rejected(_repack(fields), "malformed")


_COMPACT = compact(metrics={**METRICS, "t_task": 1.7e9, "t_start": 1.7e9 + 0.1})


@FUZZ
@given(st.integers(0, len(_COMPACT) - 1), st.integers(0, 255))
def test_mutated_compact_envelopes(pos, byte):
    data = bytearray(_COMPACT)
    data[pos] = byte
    try:
        got = decode_update(bytes(data), topic_device_id=DEVICE, spec=SPEC)
    except WireError:
        return
    assert all(np.isfinite(a).all() and a.shape == SPEC[k] for k, a in got.delta.items())


@FUZZ
@given(st.binary(max_size=400))
def test_random_compact_envelopes(body):
    for flags in (FORMAT_VERSION, 0x10 | FORMAT_VERSION):
        try:
            decode_update(bytes([COMPACT_MAGIC, flags]) + body, topic_device_id=DEVICE, spec=SPEC)
        except WireError:
            pass


# ---------------------------------------------------------------------------------------------
# the model delta (downlink)


def test_model_delta_round_trip_and_apply():
    base = unflatten(delta_flat(5, 0.1), SPEC)
    codec = PruneCodec(threshold=0.0, bits=8, block=64)
    data, idx, sent = codec.compress(delta_flat(6), SPEC, rng())
    change = np.zeros(N, dtype=np.float32)
    change[idx] = sent
    target = apply_delta(base, unflatten(change, SPEC))
    msg = ModelDelta(8, 7, 8, "mlp_digits", {}, weights_digest(target, SPEC))
    got = decode_model_delta(encode_model_delta(msg, codec, data), spec=SPEC, model="mlp_digits")
    assert (got.version, got.base, got.round) == (8, 7, 8)
    assert weights_digest(apply_delta(base, got.delta), SPEC) == msg.target_sha256


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("version", 7, "malformed"),  # not after its base
        ("base", -1, "malformed"),
        ("model", "mlp_mnist", "model"),
        ("target", "0" * 63, "malformed"),
        ("target", "G" * 64, "malformed"),
        ("codec", {"name": "zip"}, "codec"),
        ("body", b"\x00", "size"),
        ("fmt", "edgefl.model", "malformed"),
    ],
)
def test_model_delta_with_a_bad_field(key, value, reason):
    data = PruneCodec(threshold=0.0).compress(delta_flat(), SPEC, rng())[0]
    obj = msgpack.unpackb(
        encode_model_delta(ModelDelta(8, 7, 8, "mlp_digits", {}, "a" * 64), PruneCodec(), data)
    )
    obj[key] = value
    with pytest.raises(WireError) as info:
        decode_model_delta(msgpack.packb(obj, use_bin_type=True), spec=SPEC, model="mlp_digits")
    assert info.value.reason == reason, str(info.value)


# ---------------------------------------------------------------------------------------------
# configuration


def test_codec_from_config_takes_the_parameters_the_codec_knows():
    cfg = CodecConfig(name="topk", fraction=0.005, bits=4, momentum=0.5, threshold=0.5)
    spec = codec_from_config(cfg).spec()
    assert (spec["name"], spec["fraction"], spec["bits"], spec["momentum"]) == (
        "topk", 0.005, 4, 0.5,
    )
    assert "threshold" not in spec  # prune's, not top-k's
    assert codec_from_config(CodecConfig(name="fp16", bits=2)).spec() == {
        "name": "fp16", "zstd": CodecConfig().zstd,
    }
    assert make_codec(codec_from_config(cfg).spec()).spec() == codec_from_config(cfg).spec()
    with pytest.raises(ConfigError, match="fraction"):
        codec_from_config(CodecConfig(name="topk", fraction=2.0))
    with pytest.raises(ConfigError, match="known|one of"):
        codec_from_config(CodecConfig(name="gzip"))


def test_every_codec_has_a_distinct_wire_id():
    assert len({c.wire_id for c in CODECS.values()}) == len(CODECS)
