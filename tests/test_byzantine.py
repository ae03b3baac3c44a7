"""A fifth of the fleet sends hostile updates (sign-flipped, or scaled by -10): robust
aggregation keeps B1's accuracy within 2 points of the clean run, where the plain mean would
collapse. The whole B1 fleet (20 agents, each with its own MQTT connection) over the broker."""

from __future__ import annotations

import pytest

ROUNDS = 20
ATTACKERS = {3: -1.0, 8: -10.0, 13: -1.0, 18: -10.0}  # device index -> factor on its delta


def _hostile(agent, factor: float) -> None:
    """The agent trains honestly, then sends its delta multiplied by ``factor``."""
    encode = agent.encoder.encode

    def forged(task, base, trained, num_samples, metrics):
        twisted = {k: base.weights[k] + factor * (trained[k] - base.weights[k]) for k in trained}
        return encode(task, base, twisted, num_samples, metrics)

    agent.encoder.encode = forged


def _run(make_fleet, aggregation: str, attack: bool) -> float:
    fleet = make_fleet(devices=20)
    agents = [fleet.start_agent(i) for i in range(20)]
    if attack:
        for i, factor in ATTACKERS.items():
            _hostile(agents[i], factor)
    cfg = fleet.aggregator_config(rounds=ROUNDS, deadline_s=30.0)
    cfg.strategy.aggregation = aggregation
    cfg.state_dir = str(fleet.tmp / f"aggregator-{aggregation}-{attack}")
    with fleet.aggregator(cfg) as agg:
        history = agg.run()
    fleet.close()
    assert all(m.reported == 20 for m in history)
    return history[-1].accuracy


@pytest.mark.parametrize("aggregation", ["screened_clip"])
def test_robust_aggregation_holds_against_a_hostile_fifth(make_fleet, aggregation) -> None:
    clean = _run(make_fleet, "mean", attack=False)
    attacked = _run(make_fleet, aggregation, attack=True)
    undefended = _run(make_fleet, "mean", attack=True)
    assert clean > 0.85
    assert attacked >= clean - 0.02, (clean, attacked)
    # the attack is real: without a robust rule the model is ruined
    assert undefended < clean - 0.2, (clean, undefended)
