"""The local three-device walkthrough (README.md, "Three devices on one machine"), run as a
newcomer runs it: the ```sh walkthrough block, pasted into bash, with only its PORT and WORK
lines changed (a free port, a temporary directory). It starts its own Mosquitto with `edgefl
broker`; the test then checks what the walkthrough promises: all three devices trained in every
round, the model was deployed to each of them, and `edgefl predict` answered from dev-1's
installed model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker import free_port
from edgefl.data import load_npz

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "README.md"
DEVICES = ("dev-1", "dev-2", "dev-3")
TIMEOUT_S = 240  # the walkthrough itself takes about 30 s here; a loaded machine, more


def walkthrough_block(text: str) -> str:
    """The one fenced block marked ``sh walkthrough``."""
    blocks = re.findall(r"^```sh walkthrough\n(.*?)^```$", text, flags=re.S | re.M)
    assert len(blocks) == 1, "README.md must hold exactly one ```sh walkthrough block"
    return blocks[0]


def with_settings(block: str, port: int, work: Path) -> str:
    """Replace the values of the variables the block declares at its top, nothing else."""
    head, sep, body = block.partition("\n\n")
    assert re.search(r"^PORT=\S+$", head, re.M) and re.search(r"^WORK=\S+$", head, re.M), head
    head = re.sub(r"^PORT=\S+$", f"PORT={port}", head, flags=re.M)
    head = re.sub(r"^WORK=\S+$", f"WORK={work}", head, flags=re.M)
    return head + sep + body


def test_the_block_is_found_and_only_its_settings_change(tmp_path):
    block = walkthrough_block(DOC.read_text())
    changed = with_settings(block, 12345, tmp_path)
    assert "PORT=12345" in changed and f"WORK={tmp_path}" in changed
    assert changed.split("\n\n", 1)[1] == block.split("\n\n", 1)[1]
    assert "edgefl split" in block and "edgefl predict" in block


@pytest.fixture
def work() -> Iterator[Path]:
    # Not under pytest's tmp_path (0700): started by root, Mosquitto drops to the user
    # "mosquitto", which must be able to enter WORK to reach WORK/broker.
    parent = Path(tempfile.mkdtemp(prefix="edgefl-walkthrough-"))
    parent.chmod(0o755)
    yield parent / "edgefl-local"
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.broker
@pytest.mark.slow
def test_the_local_walkthrough_trains_deploys_and_predicts(tmp_path, work):
    script = with_settings(walkthrough_block(DOC.read_text()), free_port(), work)
    env = dict(os.environ)
    # what `. .venv/bin/activate` gives: this Python's edgefl first on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = time.monotonic()
    # its own session: whatever the block leaves running is ended with it, by its group id
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the walkthrough took over {TIMEOUT_S} s:\n{out[-4000:]}{_logs(work)}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}{_logs(work)}"

    # every round had all three devices, and the model improved
    rounds = [json.loads(line) for line in (work / "aggregator" / "rounds.jsonl").open()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    for r in rounds:
        assert (r["participants"], r["reported"], r["applied"]) == (3, 3, True), r
        assert sorted(r["energy_by_device"]) == list(DEVICES)  # who trained
    assert rounds[-1]["accuracy"] > 0.8 and rounds[-1]["accuracy"] > rounds[0]["accuracy"]

    # the split gave each device its own share, and the test set to the aggregator
    held = [load_npz(work / "devices" / d / "data.npz") for d in DEVICES]
    test = load_npz(work / "devices" / "test.npz")
    assert sum(len(h) for h in held) + len(test) == 1797
    assert rounds[0]["samples"] == sum(len(h) for h in held)  # each trained on its own share

    # the final model is installed on every device
    for d in DEVICES:
        current = json.loads(
            (work / "devices" / d / "state" / "models" / "current.json").read_text()
        )
        assert (current["version"], current["variant"]) == (5, "fp32"), d

    # and edgefl predict answered from dev-1's copy: a class per test sample, its accuracy said
    predicted = np.loadtxt(work / "predictions.txt", dtype=np.int64)
    assert predicted.shape == (len(test),)
    accuracy = float((predicted == test.y).mean())
    assert f"model v5 (fp32): accuracy {accuracy:.4f} on {len(test)} samples" in out
    assert abs(accuracy - rounds[-1]["accuracy"]) < 1e-6  # the same model the aggregator judged
    # the summary of edgefl split and the round lines reached the terminal
    assert "digits: 1,437 samples over 3 devices" in out
    assert "round 5: 3/3 reported" in out

    # nothing it started is left running: the broker's pid file goes when Mosquitto exits
    assert not (work / "broker" / "mosquitto.pid").exists()
    print(f"walkthrough took {elapsed:.1f} s")


def _logs(work: Path) -> str:
    parts = []
    for path in [work / "broker.log", *sorted((work / "devices").glob("*.log"))]:
        if path.exists():
            parts.append(f"\n--- {path.name} ---\n{path.read_text()[-1500:]}")
    return "".join(parts)
