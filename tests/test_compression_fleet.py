"""Compressed updates and the delta downlink over the private Mosquitto: real agents, a real
aggregator, one MQTT connection each."""

from __future__ import annotations

import logging

from edgefl.compression import flatten
from edgefl.error_feedback import FILE_NAME, ErrorFeedback
from edgefl.messages import weights_digest
from tests.conftest import finite, wait_until

TOPK = {"name": "topk", "fraction": 0.05, "bits": 4, "momentum": 0.5, "block": 128}


def compressed_config(fleet, rounds: int, **codec):
    cfg = fleet.aggregator_config(rounds=rounds)
    for k, v in {**TOPK, "downlink": "delta", **codec}.items():
        setattr(cfg.codec, k, v)
    return cfg


def test_topk_updates_and_delta_downlink_learn_and_stay_in_step(make_fleet) -> None:
    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i) for i in range(3)]
    with fleet.aggregator(compressed_config(fleet, rounds=4)) as agg:
        history = agg.run()
        digest = weights_digest(agg.weights, agg.spec)
        wait_until(
            lambda: all(a.model_version == agg.version for a in agents), what="the last delta"
        )
    assert [m.reported for m in history] == [3, 3, 3, 3]
    assert history[-1].accuracy > 0.5 and finite(agg.weights)
    assert agg.rejected == {} or sum(agg.rejected.values()) == 0
    # 5 % of 9,610 values at 4 bits: about 1/20 of a dense update
    per_update = sum(m.uplink_bytes for m in history) / sum(m.reported for m in history)
    assert per_update < 38_000 / 12
    # the model went out in full once (at the start), then as deltas, and every device holds
    # exactly the aggregator's model
    for a in agents:
        assert a.sync.full_fetches == 1 and a.sync.deltas_applied == 4
        assert weights_digest(a.global_model.weights, agg.spec) == digest
    full = history[0].downlink_bytes / 3
    assert all(m.downlink_bytes / 3 < full / 2 for m in history[1:])


def test_an_agent_restart_keeps_its_error_feedback_and_catches_up(make_fleet, caplog) -> None:
    fleet = make_fleet(devices=2)
    fleet.start_agent(0)
    first = fleet.start_agent(1)
    state = fleet.tmp / "devices" / "dev-1" / FILE_NAME
    with fleet.aggregator(compressed_config(fleet, rounds=4)) as agg:
        agg.run(rounds=2)
        wait_until(lambda: first.model_version == 2, what="the model after round 2")
        first.stop()
        saved = ErrorFeedback(state, agg.spec).state
        assert saved is not None and saved.base_version == 1 and saved.round == 2
        with caplog.at_level(logging.INFO, logger="edgefl.error_feedback"):
            second = fleet.start_agent(1)  # the same device, a new process: same state_dir
            wait_until(lambda: second.model_version == 2, what="the restarted agent's model")
            (m3, m4) = agg.run(rounds=4)[2:]
        assert "error feedback restored" in caplog.text
        assert m3.reported == 2 and m4.reported == 2
        # its first update after the restart built on the residual it had before
        assert second.encoder.feedback is not None
        assert second.encoder.feedback.state.round == 4
        assert second.sync.full_fetches == 1  # from the retained model, at start
        wait_until(lambda: second.model_version == agg.version, what="the last delta")
        assert flatten(second.global_model.weights, agg.spec).tobytes() == (
            flatten(agg.weights, agg.spec).tobytes()
        )


def test_a_device_that_joins_late_gets_the_full_model(make_fleet) -> None:
    fleet = make_fleet(devices=3)
    for i in range(2):
        fleet.start_agent(i)
    cfg = compressed_config(fleet, rounds=2)
    cfg.rounds.min_devices = 2
    with fleet.aggregator(cfg) as agg:
        agg.run()
        late = fleet.start_agent(2)
        wait_until(lambda: late.model_version == agg.version, what="the late device's model")
        assert weights_digest(late.global_model.weights, agg.spec) == weights_digest(
            agg.weights, agg.spec
        )
        assert late.sync.deltas_applied == 0 and late.sync.full_fetches == 1
