"""The real workloads end to end (configs/fmnist.toml, configs/watch.toml), shrunk to seconds:
the programs of a deployment over a private Mosquitto capped at 256 KiB, so that the CNN's
global model, its dense updates and its ONNX rollout all travel in chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefl.config import RunConfig, load
from edgefl.models import model_info
from launch.local import run_local

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _run(tmp_path: Path, config: str, **over) -> dict:
    cfg = load(RunConfig, ROOT / "configs" / config, over)
    result = run_local(cfg, tmp_path / "run")
    assert result.ok, result.error
    return result.metrics


def test_the_fashion_mnist_cnn_trains_and_rolls_out_in_chunks(tmp_path: Path) -> None:
    m = _run(
        tmp_path,
        "fmnist.toml",
        rounds={"rounds": 2},
        data={"train_samples": 800, "test_samples": 400},
        demo={"devices": 4, "device_processes": 1, "solo_device": False},
        deploy={"canary_fraction": 0.5},
    )
    limit = m["config"]["demo"]["max_packet_bytes"]
    assert limit == 256 * 1024
    dense = 4 * model_info("cnn_fmnist").parameters
    assert dense > limit  # so the model and the updates cannot go whole
    rounds = m["rounds"]
    assert [r["reported"] for r in rounds] == [4, 4] and all(r["applied"] for r in rounds)
    # every device got the whole model each round, and every update (zstd takes a fifth off
    # it) arrived whole: both larger than a packet
    assert all(r["downlink_bytes"] / r["participants"] >= dense for r in rounds)
    assert all(r["uplink_bytes"] / r["reported"] > limit for r in rounds)
    onnx = m["onnx"]
    assert onnx["parity_max_abs"] <= 1e-4
    fp32, int8 = onnx["variants"]["fp32"], onnx["variants"]["int8"]
    assert fp32["bytes"] > limit and int8["quantisation"] == "static"
    assert int8["bytes"] <= 0.3 * fp32["bytes"]
    dep = m["deployment"]
    assert dep["canary"]["healthy"] and len(dep["canary"]["devices"]) == 2
    assert dep["promoted"] and dep["devices_serving"] == 4
    assert dep["chunks"] >= 2  # the ONNX file did not fit one packet


def test_the_cnn_trains_with_compressed_updates_and_serves_int8(tmp_path: Path) -> None:
    m = _run(
        tmp_path,
        "fmnist.toml",
        rounds={"rounds": 2},
        data={"train_samples": 800, "test_samples": 400},
        demo={"devices": 4, "device_processes": 1, "solo_device": False},
        codec={"name": "topk", "fraction": 0.008, "bits": 2, "momentum": 0.5, "block": 128},
        deploy={"variant": "int8"},
    )
    rounds = m["rounds"]
    assert all(r["reported"] == 4 and r["applied"] for r in rounds)
    # about 1.3 KB an update instead of 468 KB: one packet, error feedback kept on the device
    assert all(r["uplink_bytes"] / r["reported"] < 4096 for r in rounds)
    assert list((tmp_path / "run" / "devices").glob("*/error_feedback.msgpack"))
    dep = m["deployment"]
    assert dep["variant"] == "int8" and dep["promoted"] and dep["devices_serving"] == 4


def test_the_watch_fleet_is_one_device_per_wearer(tmp_path: Path) -> None:
    m = _run(tmp_path, "watch.toml", rounds={"rounds": 2})
    part = json.loads((tmp_path / "run" / "data" / "partition.json").read_text())
    assert m["rounds"][-1]["reported"] == 8
    assert m["final_acc"] is not None
    assert m["deployment"]["devices_serving"] == 8
    # wearers 9 and 10 never trained: the accuracy is that of people the model never saw
    assert part["test_subjects"] == [9, 10]
