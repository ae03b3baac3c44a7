"""Decode time of one update envelope: what bounds the aggregator's ingest rate.

A realistic B1 update (the ``mlp_digits`` model, a delta of N(0, 0.01) values, the metrics an
agent sends) in the two encodings devices use: dense fp32 with zstd (the default) and top-k 1 %
at 2 bits. Each is decoded ``--n`` times with every check the aggregator applies (topic device,
round, base version, model shape), in blocks of 100; the figure is the median over blocks of
the microseconds per decode, with the 10th and 90th percentiles.

    python -m benchmarks.decode [--n 3000]

It imports ``edgefl`` from wherever ``sys.path`` finds it, so the same script times older code:
``PYTHONPATH=/path/to/old/checkout python benchmarks/decode.py``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import edgefl
from edgefl.compression import make_codec
from edgefl.messages import Update, decode_update, encode_compact_update
from edgefl.models import build_model, model_spec

CODECS = {
    "dense_fp32+zstd": {"name": "dense_fp32"},
    "topk 1% 2-bit": {"name": "topk", "fraction": 0.01, "bits": 2},
}


def b1_update(codec_spec: dict) -> tuple[bytes, dict]:
    spec = model_spec(build_model("mlp_digits", seed=0))
    rng = np.random.default_rng(0)
    delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in spec.items()}
    now = time.time()
    metrics = {
        "loss": 0.31,
        "accuracy": 0.91,
        "train_s": 0.052,
        "cpu_s": 0.05,
        "steps": 20.0,
        "samples_seen": 640.0,
        "t_task": now - 0.06,
        "t_start": now - 0.055,
        "t_end": now - 0.003,
    }
    update = Update("dev-3", 4, 3, 128, delta, metrics)
    return encode_compact_update(update, make_codec(codec_spec), spec), spec


def time_decodes(payload: bytes, spec: dict, n: int, block: int = 100) -> list[float]:
    """Microseconds per decode, one figure per block of ``block`` decodes (a block's mean
    smooths the clock's resolution; the median over blocks the machine's other work)."""
    for _ in range(50):  # warm caches and the allocator
        decode_update(payload, topic_device_id="dev-3", spec=spec, expect_round=4, expect_base=3)
    out = []
    clock = time.perf_counter_ns
    for _ in range(max(1, n // block)):
        t = clock()
        for _ in range(block):
            decode_update(
                payload, topic_device_id="dev-3", spec=spec, expect_round=4, expect_base=3
            )
        out.append((clock() - t) / 1000.0 / block)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    figures = {"edgefl": edgefl.__file__, "n": args.n}
    print(f"edgefl from {edgefl.__file__}, {args.n} decodes each")
    for label, codec_spec in CODECS.items():
        payload, spec = b1_update(codec_spec)
        us = np.array(time_decodes(payload, spec, args.n))
        p10, p50, p90 = np.percentile(us, [10, 50, 90])
        figures[label] = {"bytes": len(payload), "median_us": round(float(p50), 1),
                          "p10_us": round(float(p10), 1), "p90_us": round(float(p90), 1)}
        spread = f"p10 {p10:.1f}, p90 {p90:.1f}"
        print(f"{label:16s} {len(payload):6d} B  median {p50:6.1f} us ({spread})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
