"""A serve-only device: the agent of a `device/install.sh --serve-only` install, which has no
torch. It runs as `edgefl device` in a process where torch cannot be imported, over the real
private broker, next to a fleet that trains and deploys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggregator.scheduler import SERVE_ONLY
from device.inference import LocalModels
from edgefl.config import to_dict, to_toml
from edgefl.data import save_npz
from edgefl.messages import Reply, Task
from edgefl.mqtt import MqttLink
from tests.conftest import FLEET, wait_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.broker

# `edgefl device` with torch made impossible to import, as on a device that never installed it
WITHOUT_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
from launch.cli import main

code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_a_device_without_torch_serves_the_deployed_model_and_declines_training(
    make_fleet, broker, tmp_path: Path
) -> None:
    fleet = make_fleet(devices=2)
    fleet.start_agent(0)
    cfg = fleet.device_config("serves")
    cfg.data = str(tmp_path / "serves.npz")
    save_npz(cfg.data, fleet.data[1])
    config = tmp_path / "serves.toml"
    config.write_text(to_toml(to_dict(cfg)))
    stats = tmp_path / "stats.json"
    log = (tmp_path / "serves.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-c", WITHOUT_TORCH, "device", "--config", str(config)]
        + ["--stats-out", str(stats)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        agg_cfg = fleet.aggregator_config(rounds=2, min_devices=2)
        agg_cfg.deploy.rollout_timeout_s = 20.0
        with fleet.aggregator(agg_cfg) as agg:
            wait_until(
                lambda: (r := agg.registry.get("serves")) is not None and r.online,
                timeout=30,
                what="the serve-only agent's birth",
            )
            assert agg.registry.get("serves").capabilities["trains"] is False
            rounds = agg.run()
            deployed = agg.deploy(exported := agg.export())
            wait_until(
                lambda: agg.registry.get("serves").serving_seq == deployed["seq"],
                timeout=20,
                what="the serve-only device reporting the deployed model",
            )
        # it was never given work, and the rounds say why
        for m in rounds:
            assert m.participants == 1 and m.reported == 1
            assert m.left_out == {"serves": SERVE_ONLY}
        assert deployed["devices_serving"] == deployed["devices_online"] == 2

        # a task sent to it all the same is declined, with the reason
        replies: list[Reply] = []

        def on_reply(topic: str, payload: bytes) -> None:
            replies.append(Reply.from_payload(payload, topic_device_id="serves"))

        sender = MqttLink("test-sender", broker.broker_config(broker.aggregator), clean_start=True)
        sender.subscribe(f"edgefl/{FLEET}/devices/serves/reply", on_reply)
        with sender:
            task = Task(9, 2, 1, 32, 0.1, {"name": "dense_fp32"}, time.time() + 30)
            sender.publish(f"edgefl/{FLEET}/devices/serves/task", task.to_payload(), qos=1)
            wait_until(lambda: replies, timeout=10, what="the serve-only device's reply")
        (reply,) = replies
        assert (reply.round, reply.kind) == (9, "declined")
        assert "serve-only device: torch is not installed" in reply.reason
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=20)
        log.close()
    assert code == 0, (tmp_path / "serves.log").read_text()

    # it served the deployed model, from its own store, and never loaded torch (asserted above)
    served = json.loads(stats.read_text())
    assert served["serving"] == {"serves": exported["version"]}
    assert served["updates_sent"] == 0
    assert served["hardware"]["serves"]["replies"] == {"declined": 1}
    store = LocalModels(Path(cfg.state_dir) / "models")
    assert store.current()["version"] == exported["version"]
    assert store.path(deployed["sha256"]) is not None
