"""B5 of docs/benchmarks.md: deploying the B1 global model as ONNX.

1. B1 runs end to end over MQTT (launch.local.run_local); its aggregator exports the final model
   (fp32 checked against PyTorch on the test split, and int8) and rolls it out to the 20 devices.
2. Latency of ONNX Runtime and PyTorch eager on that model, batch 1 and 64, one thread each (a
   Pi core), side by side in this process: median of repeated timing blocks.
3. Rollouts to a fleet of 20 agents over a private broker (each its own MQTT connection): time
   from the aggregator starting to publish until every device serves the model. Every timed
   rollout is a new model version (the B1 weights nudged, as a further round would) that no
   device holds yet, so each device fetches the chunks, verifies them, writes the file
   atomically, swaps its ONNX Runtime session and reports; median, min and max over repeats.
4. Resident memory of an inference-only process (device.inference, no torch), next to one that
   serves the same model with PyTorch.

    python -m benchmarks.b5_onnx [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aggregator.checkpoint import Checkpointer
from aggregator.deploy import Rollout, export, follow_statuses, store_for
from aggregator.registry import DeviceRegistry
from benchmarks.common import median, table, write_results
from broker import PrivateBroker
from device.agent import DeviceAgent
from device.inference import InferenceServer
from edgefl.config import DeviceConfig, RunConfig, load
from edgefl.data import Dataset, dirichlet_partition, load_digits_split
from edgefl.models import build_model, get_weights, model_info, set_weights
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics
from launch.local import run_local

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "b1.toml"

RSS_ONNX = """
import sys, numpy as np
from device.inference import InferenceServer
from edgefl.memory import peak_rss_mb
s = InferenceServer(); s.load(sys.argv[1])
X = np.load(sys.argv[2])
for _ in range(200): s.predict(X[:64])
assert 'torch' not in sys.modules
print(peak_rss_mb())
"""

RSS_TORCH = """
import sys, numpy as np, torch
from edgefl.memory import peak_rss_mb
from aggregator.checkpoint import Checkpointer
from edgefl.models import build_model, set_weights
torch.set_num_threads(1)
m = build_model('mlp_digits'); set_weights(m, Checkpointer(sys.argv[1]).load()['weights'])
m.train(False); X = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    for _ in range(200): m(X[:64])
print(peak_rss_mb())
"""


def latency_ms(fn, x, repeats: int, calls: int) -> float:
    for _ in range(50):
        fn(x)
    blocks = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        blocks.append((time.perf_counter() - t) / calls * 1000)
    return float(median(blocks))


def rollouts(
    store_dir: Path, model: nn.Module, version: int, test: Dataset, repeats: int
) -> list[float]:
    """Roll ``repeats`` new model versions out to 20 fresh agents, one after the other."""
    train, _ = load_digits_split()
    parts = dirichlet_partition(train.y, 20, 0.5, seed=0, min_samples=10)
    ids = [f"dev-{i:02d}" for i in range(20)]
    times = []
    store = store_for(store_dir)
    base = store.info(version) or {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, PrivateBroker("b5", device_ids=ids) as broker:
        pool = ThreadPoolExecutor(4)
        agents = [
            DeviceAgent(
                DeviceConfig(
                    fleet="b5",
                    device_id=d,
                    broker=broker.broker_config(broker.device_account(d)),
                    state_dir=f"{tmp}/{d}",
                ),
                Dataset(train.X[p], train.y[p]),
                executor=pool,
            ).start()
            for d, p in zip(ids, parts, strict=True)
        ]
        cfg = load(RunConfig, CONFIG).deploy
        registry, topics = DeviceRegistry(), Topics("b5")
        link = MqttLink("b5-aggregator", broker.broker_config(broker.aggregator), clean_start=True)
        follow_statuses(link, topics, registry)
        with link:
            registry.wait_online(20, 30)
            rollout = Rollout(link, topics, registry, "mlp_digits", store, cfg)
            for i in range(repeats):
                # the next version: the B1 weights plus a small nudge, as one more round would
                # give; exporting it (not timed) makes a file no device has seen
                new = version + 1 + i
                nudged = copy.deepcopy(model)
                set_weights(
                    nudged,
                    {
                        k: w + rng.normal(0, 1e-3, w.shape).astype(np.float32)
                        for k, w in get_weights(model).items()
                    },
                )
                exported = export(
                    nudged,
                    model_info("mlp_digits"),
                    store,
                    version=new,
                    round_=int(base.get("round", 0)),
                    accuracy=None,
                    eval_data=test,
                    int8=cfg.int8,
                )
                sha = exported["variants"][cfg.variant]["sha256"]
                # devices keep models by SHA-256: none may hold this one, or it would not be
                # downloaded and the figure would be a reload from disk
                assert all(a.deployment.store.path(sha) is None for a in agents), new
                r = rollout.publish(new)
                assert r["promoted"] and r["devices_serving"] == 20, r
                assert r["sha256"] == sha
                assert all(a.server.info.get("sha256") == sha for a in agents)
                times.append(r["rollout_s"])
        for a in agents:
            a.stop()
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="edgefl-b5-") as tmp:
        print("B1 end to end over MQTT (train, export, roll out) ...", flush=True)
        run = run_local(load(RunConfig, CONFIG), Path(tmp) / "run")
        if not run.ok:
            raise SystemExit(f"B1 run failed: {run.error}")
        agg_dir = Path(tmp) / "run" / "aggregator"
        version = run.metrics["onnx"]["version"]
        store = store_for(agg_dir)
        info = store.info(version)
        fp32, int8 = store.file(version, "fp32"), store.file(version, "int8")

        _, test = load_digits_split()
        model = build_model("mlp_digits")
        set_weights(model, Checkpointer(agg_dir / "checkpoint.msgpack").load()["weights"])
        model.train(False)
        ort_fp32, ort_int8 = InferenceServer(), InferenceServer()
        ort_fp32.load(fp32)
        ort_int8.load(int8)

        def torch_eager(x):
            with torch.no_grad():
                return model(x)

        lat = {}
        for batch, calls in ((1, 2000), (64, 500)):
            xs = np.ascontiguousarray(test.X[:batch])
            lat[f"ort_b{batch}_ms"] = latency_ms(ort_fp32.logits, xs, args.repeats, calls)
            lat[f"ort_int8_b{batch}_ms"] = latency_ms(ort_int8.logits, xs, args.repeats, calls)
            lat[f"torch_b{batch}_ms"] = latency_ms(
                torch_eager, torch.from_numpy(xs), args.repeats, calls
            )

        print("rollouts to 20 devices ...", flush=True)
        times = rollouts(agg_dir, model, version, test, args.repeats)

        xfile = Path(tmp) / "x.npy"
        np.save(xfile, test.X)
        rss = {}
        for name, code, arg in (
            ("onnx", RSS_ONNX, fp32),
            ("torch", RSS_TORCH, agg_dir / "checkpoint.msgpack"),
        ):
            out = subprocess.run(
                [sys.executable, "-c", code, str(arg), str(xfile)],
                capture_output=True,
                text=True,
                check=True,
            )
            rss[name] = float(out.stdout.strip())

    figures = {
        "parity_max_abs": info["parity_max_abs"],
        "fp32_acc": info["variants"]["fp32"]["accuracy"],
        "int8_acc": info["variants"]["int8"]["accuracy"],
        "fp32_bytes": info["variants"]["fp32"]["bytes"],
        "int8_bytes": info["variants"]["int8"]["bytes"],
        "ort_b1_ms": lat["ort_b1_ms"],
        "torch_b1_ms": lat["torch_b1_ms"],
        "ort_b64_ms": lat["ort_b64_ms"],
        "torch_b64_ms": lat["torch_b64_ms"],
        "ort_int8_b1_ms": lat["ort_int8_b1_ms"],
        "ort_int8_b64_ms": lat["ort_int8_b64_ms"],
        "rollout_s": median(times),
        "rollout_s_min": min(times),
        "rollout_s_max": max(times),
        "rollout_s_all": times,
        "rollout_in_b1_run_s": run.metrics["deployment"]["rollout_s"],
        "inference_rss_mb": rss["onnx"],
        "torch_inference_rss_mb": rss["torch"],
        "b1_final_acc": run.metrics["final_acc"],
    }
    f = figures
    text = "\n\n".join(
        [
            f"B5: the B1 global model (v{version}, test accuracy {f['b1_final_acc']:.4f}) as ONNX",
            table(
                ["figure", "value"],
                [
                    ["parity with PyTorch, max |diff| (test split)", f["parity_max_abs"]],
                    ["fp32 ONNX accuracy", f["fp32_acc"]],
                    ["int8 ONNX accuracy", f["int8_acc"]],
                    ["fp32 file, bytes", f["fp32_bytes"]],
                    [
                        "int8 file, bytes (ratio to fp32)",
                        f"{f['int8_bytes']} ({f['int8_bytes'] / f['fp32_bytes']:.2f})",
                    ],
                    [
                        f"rollout of a new version to 20 devices, s (median of {len(times)})",
                        f["rollout_s"],
                    ],
                    [
                        "  fastest / slowest, s",
                        f"{f['rollout_s_min']:.4g} / {f['rollout_s_max']:.4g}",
                    ],
                    ["inference-only process peak RSS, MB (ONNX Runtime)", f["inference_rss_mb"]],
                    ["same with PyTorch, MB", f["torch_inference_rss_mb"]],
                ],
            ),
            table(
                ["latency, ms (median, 1 thread)", "batch 1", "batch 64"],
                [
                    ["ONNX Runtime fp32", f["ort_b1_ms"], f["ort_b64_ms"]],
                    ["ONNX Runtime int8", f["ort_int8_b1_ms"], f["ort_int8_b64_ms"]],
                    ["PyTorch eager", f["torch_b1_ms"], f["torch_b64_ms"]],
                    [
                        "PyTorch / ONNX Runtime fp32",
                        f["torch_b1_ms"] / f["ort_b1_ms"],
                        f["torch_b64_ms"] / f["ort_b64_ms"],
                    ],
                ],
            ),
        ]
    )
    print(text)
    write_results("b5_onnx", figures, text)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
