"""Resource-aware rounds: the registry, the scheduler, device profiles and the battery policy,
FedNova and FedProx, the reply message; and, over the real broker, the behaviours a user relies
on: a device under its battery floor is not picked (nor, charging, given work its charger cannot
pay for), a device that declines is replaced, a device that goes silent (or whose Will fires) is
marked offline and left out of the next round, a low-memory device trains with the smaller batch
its task gives, a real device measures its uplink and reports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from aggregator.aggregation import WeightedSum
from aggregator.registry import DeviceRegistry
from aggregator.rounds import Round
from aggregator.scheduler import SERVE_ONLY, Scheduler, training_memory_bytes
from aggregator.strategies.fednova import NormalisedSum
from benchmarks.b3_fleet import floor_violations
from device.agent import DeviceAgent
from device.profiles import Hardware, SimulatedHardware, make_hardware
from device.telemetry import LinkEstimator
from edgefl.compression import WireError
from edgefl.config import (
    AggregatorConfig,
    ConfigError,
    DeviceConfig,
    ProfileConfig,
    RunConfig,
    from_dict,
)
from edgefl.data import Dataset
from edgefl.messages import (
    FORMAT_VERSION,
    PowerModel,
    Reply,
    Status,
    Task,
    Telemetry,
    Update,
    decode_update,
)
from edgefl.models import build_model, get_weights, model_spec, set_weights
from edgefl.mqtt import MqttLink
from edgefl.training import local_steps, samples_for_steps, train_local
from tests.conftest import FLEET, wait_until

SPEC = {"w": (8, 4), "b": (4,)}
POWER = PowerModel(compute_w=2.0, radio_w=1.0, battery_wh=1.0)


def sim(**kw) -> ProfileConfig:
    return ProfileConfig(simulated=True, **kw)


# ---------------------------------------------------------------------------------------------
# device profiles


def test_simulated_compute_takes_the_profiles_time_never_less_than_real():
    hw = SimulatedHardware(sim(slowdown=4.0, base_sps=1000.0))
    assert hw.compute(500, 0.1, 0.08) == (2.0, 2.0)  # 500 samples x 4 / 1000 sps
    assert hw.compute(500, 3.0, 2.5) == (3.0, 2.5)  # this machine was slower still
    assert hw.predict_compute_s(500, None) == 2.0
    stretch = SimulatedHardware(sim(slowdown=3.0))  # base_sps 0: stretch the real time
    assert stretch.compute(100, 0.2, 0.1) == pytest.approx((0.6, 0.3))
    assert stretch.predict_compute_s(100, 1000.0) == pytest.approx(0.3)


def test_simulated_battery_drains_by_energy_and_charges():
    hw = SimulatedHardware(sim(battery_pct=50.0, battery_wh=0.01, compute_w=2.0, radio_w=1.0))
    assert hw.energy(cpu_s=3.0, upload_s=2.0) == 8.0
    hw.spend(3.6)  # 0.01 Wh is 36 J: 10 %
    pct, charging = hw.battery()
    assert pct == pytest.approx(40.0) and charging is False
    assert hw.lowest_after_work_pct == pytest.approx(40.0)
    hw.spend(1000.0)
    assert hw.battery()[0] == 0.0  # empty, not negative
    assert hw.report()["energy_j"] == pytest.approx(1003.6)
    charger = SimulatedHardware(sim(battery_pct=50.0, battery_wh=0.01, charging=True, charge_w=36))
    time.sleep(0.05)  # 36 W into 36 J: 100 % per second
    assert charger.battery()[0] > 53.0
    # work over 1 s that uses less than the charger gives meanwhile does not make it fall ...
    charger.spend(1.0, seconds=1.0)
    assert charger.lowest_after_work_pct is None
    # ... work that uses more does, charging or not: it counts for the floor
    charger.spend(3.6, seconds=0.01)  # 10 %, less 1 % charged meanwhile
    low = charger.lowest_after_work_pct
    assert low is not None and low == pytest.approx(charger.battery()[0], abs=0.5)


def test_simulated_link_and_telemetry_in_the_common_format():
    hw = make_hardware(sim(battery_pct=70.0, charging=True, link_kbps=500.0))
    assert hw.upload_s(62_500) == pytest.approx(1.0)  # 500 kbit/s
    reading = hw.telemetry(42)
    assert (reading.samples, reading.charging) == (42, True)
    assert reading.battery_percent == pytest.approx(70.0, abs=0.1)  # charging slowly
    assert reading.link_kbps == 500.0
    assert Telemetry.from_payload(reading.to_payload()) == reading
    mains = make_hardware(sim())
    assert mains.battery() == (None, None) and mains.telemetry(1).battery_percent is None
    assert isinstance(make_hardware(ProfileConfig()), Hardware)
    assert make_hardware(ProfileConfig()).upload_s(10**6) == 0.0
    caps = mains.capabilities()
    assert PowerModel.from_capabilities(caps) == PowerModel(3.0, 1.0, 10.0)


@pytest.mark.parametrize("bad", [{"slowdown": 0.5}, {"battery_pct": 120.0}, {"link_kbps": -1}])
def test_bad_profiles_are_refused(bad):
    with pytest.raises(ValueError):
        SimulatedHardware(sim(**bad))


def test_run_config_assigns_profiles_from_toml(tmp_path):
    import tomllib

    cfg = from_dict(
        RunConfig,
        tomllib.loads(
            "[[profiles]]\nsimulated = true\nslowdown = 8\nbattery_pct = 30\n"
            "[[profiles]]\nsimulated = true\nlink_kbps = 500\n"
        ),
    )
    assert [p.slowdown for p in cfg.profiles] == [8.0, 1.0]
    assert cfg.profiles[0].battery_pct == 30.0 and cfg.profiles[1].battery_pct is None
    with pytest.raises(ConfigError, match=r"profiles\[0\]"):
        from_dict(RunConfig, {"profiles": [{"slowdown": "fast"}]})


# ---------------------------------------------------------------------------------------------
# messages


def test_reply_round_trip():
    reply = Reply("dev-1", 7, "declined", "battery: 21% would fall to 19%", {"battery_pct": 21.0})
    payload = reply.to_payload()
    got = Reply.from_payload(payload, topic_device_id="dev-1")
    assert (got.device_id, got.round, got.kind, got.reason) == (
        "dev-1",
        7,
        "declined",
        reply.reason,
    )
    assert got.metrics == {"battery_pct": 21.0}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"device": "dev-2"}, "device_mismatch"),
        ({"kind": "exploded"}, "malformed"),
        ({"round": -1}, "malformed"),
        ({"metrics": {"cpu_s": "lots"}}, "malformed"),
        ({"reason": 5}, "malformed"),
        ({"v": 1}, "version"),
        ({"v": FORMAT_VERSION + 1}, "version"),
        ({"fmt": "edgefl.update"}, "malformed"),
    ],
)
def test_hostile_replies_are_refused(change, reason):
    obj = json.loads(Reply("dev-1", 3, "late", "x").to_payload()) | change
    with pytest.raises(WireError) as e:
        Reply.from_payload(json.dumps(obj).encode(), topic_device_id="dev-1")
    assert e.value.reason == reason


def test_power_model_from_capabilities_is_validated():
    assert PowerModel.from_capabilities({}) is None
    with pytest.raises(WireError):
        PowerModel.from_capabilities({"power": {"compute_w": -1, "radio_w": 1, "battery_wh": 1}})
    with pytest.raises(WireError):
        PowerModel.from_capabilities({"power": "lots"})


def test_task_carries_the_proximal_term():
    task = Task(1, 0, 2, 32, 0.1, {"name": "fp16"}, time.time() + 5, max_steps=7, prox_mu=0.01)
    got = Task.from_payload(task.to_payload())
    assert (got.max_steps, got.prox_mu, got.codec) == (7, 0.01, task.codec)
    assert got.codec.name == "fp16"


# ---------------------------------------------------------------------------------------------
# FedNova and FedProx


def test_fednova_normalises_by_local_steps():
    rng = np.random.default_rng(0)
    d1 = {k: rng.normal(size=s).astype(np.float32) for k, s in SPEC.items()}
    d2 = {k: rng.normal(size=s).astype(np.float32) for k, s in SPEC.items()}
    nova = NormalisedSum(SPEC)
    nova.add(d1, 30, steps=2)
    nova.add(d2, 10, steps=10)
    p1, p2 = 0.75, 0.25
    tau_eff = p1 * 2 + p2 * 10
    assert nova.effective_steps == pytest.approx(tau_eff)
    for k in SPEC:
        expected = tau_eff * (p1 * d1[k] / 2 + p2 * d2[k] / 10)
        np.testing.assert_allclose(nova.mean()[k], expected, rtol=1e-6, atol=1e-7)
    # with equal steps everywhere it is FedAvg
    same, plain = NormalisedSum(SPEC), WeightedSum(SPEC)
    for d, n in ((d1, 30), (d2, 10)):
        same.add(d, n, steps=4)
        plain.add(d, n)
    for k in SPEC:
        np.testing.assert_allclose(same.mean()[k], plain.mean()[k], rtol=1e-6)


def test_a_round_with_fednova_holds_claimed_steps_to_the_task():
    rnd = Round(1, 0, ["a", "b"], time.time() + 5, SPEC, step_caps={"a": 4},
                accumulator=NormalisedSum(SPEC))
    ones = {k: np.ones(s, np.float32) for k, s in SPEC.items()}
    # "a" claims 0.001 steps to blow its delta up; it is held to at least 1 and at most 4
    rnd.offer(Update("a", 1, 0, 10, ones, {"steps": 0.001}), 100)
    rnd.offer(Update("b", 1, 0, 10, ones, {"steps": 2.0}), 100)
    assert rnd.sum.effective_steps == pytest.approx(1.5)
    np.testing.assert_allclose(rnd.sum.mean()["b"], 1.5 * (0.5 / 1 + 0.5 / 2))


def test_fedprox_keeps_local_training_near_the_global_model(digits):
    train, _ = digits
    data = Dataset(train.X[:200], train.y[:200])
    start = get_weights(build_model("mlp_digits", seed=0))

    def drift(mu: float) -> float:
        model = build_model("mlp_digits")
        set_weights(model, start)
        train_local(model, data, epochs=5, batch_size=16, lr=0.2, seed=1, prox_mu=mu)
        return sum(float(np.sum((w - start[k]) ** 2)) for k, w in get_weights(model).items())

    assert drift(1.0) < 0.8 * drift(0.0)
    # mu = 0 is exactly the plain SGD step
    a, b = build_model("mlp_digits"), build_model("mlp_digits")
    set_weights(a, start)
    set_weights(b, start)
    train_local(a, data, epochs=1, batch_size=32, lr=0.1, seed=3)
    train_local(b, data, epochs=1, batch_size=32, lr=0.1, seed=3, prox_mu=0.0)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_step_and_sample_counts_match_train_local(digits):
    train, _ = digits
    data = Dataset(train.X[:70], train.y[:70])
    for epochs, batch, cap in [(1, 32, 0), (3, 32, 0), (5, 32, 7), (2, 100, 0), (4, 16, 9)]:
        result = train_local(
            build_model("mlp_digits"), data, epochs=epochs, batch_size=batch, lr=0.1, max_steps=cap
        )
        steps = local_steps(70, epochs, batch, cap)
        assert result.steps == steps
        assert result.samples_seen == samples_for_steps(70, batch, steps)


# ---------------------------------------------------------------------------------------------
# registry and scheduler, without a broker


def _device(
    reg: DeviceRegistry,
    device_id: str,
    *,
    samples: int = 100,
    sps: float | None = None,
    battery: float | None = None,
    charging: bool = False,
    link_kbps: float | None = None,
    power: PowerModel = POWER,
    mem_mb: float = 100.0,
    charge_w: float | None = None,
    trains: bool | None = None,
) -> None:
    reading = Telemetry(
        cpu_percent=1.0,
        mem_available_mb=mem_mb,
        samples=samples,
        battery_percent=battery,
        charging=charging if battery is not None else None,
        link_kbps=link_kbps,
    )
    caps: dict = {"power": dataclasses.asdict(power)}
    if charge_w is not None:
        caps["charge_w"] = charge_w
    if trains is not None:
        caps["trains"] = trains
    reg.on_status(device_id, Status("online", capabilities=caps, telemetry=reading))
    if sps is not None:
        reg.on_work(device_id, {"samples_seen": sps * 2, "train_s": 2.0})


def _scheduler(reg: DeviceRegistry, spec=SPEC, **schedule) -> Scheduler:
    cfg = AggregatorConfig()
    cfg.schedule.workload = "adaptive"
    for k, v in schedule.items():
        target = cfg.rounds if hasattr(cfg.rounds, k) else cfg.schedule
        setattr(target, k, v)
    return Scheduler(cfg, reg, spec)


@pytest.mark.parametrize("workload", ["uniform", "adaptive"])
def test_a_serve_only_device_is_left_out_and_says_why(workload):
    reg = DeviceRegistry()
    _device(reg, "trains", sps=500.0)
    _device(reg, "says-it-trains", sps=500.0, trains=True)
    _device(reg, "serves", sps=500.0, trains=False)  # no torch on it (device/agent.py)
    scheduler = _scheduler(reg, workload=workload, budget_s=1.0)
    plan = scheduler.plan(1, 0)
    assert plan.participants == ["says-it-trains", "trains"]
    assert set(plan.tasks) == {"says-it-trains", "trains"}
    assert plan.left_out == {"serves": SERVE_ONLY}
    assert "serves" not in scheduler.eligible()
    assert scheduler.replacement(1, 0, time.time() + 60, {"trains", "says-it-trains"}) is None
    # a fleet of serve-only devices has no round to run
    only = DeviceRegistry()
    _device(only, "serves", trains=False)
    assert _scheduler(only, workload=workload).plan(1, 0) is None


def test_adaptive_workloads_fit_the_budget_and_follow_speed():
    reg = DeviceRegistry()
    # 100 samples, batch 32: 4 steps per epoch, full work (5 epochs) is 500 samples
    for i, sps in enumerate([1000.0, 500.0, 250.0, 125.0]):  # full work: 0.5, 1, 2, 4 s
        _device(reg, f"d{i}", sps=sps)
    plan = _scheduler(reg, budget_quantile=0.5, deadline_s=60.0).plan(1, 0)
    assert plan.budget_s == pytest.approx(1.5)  # median of 0.5, 1, 2, 4
    steps = {d: plan.step_caps[d] for d in plan.participants}
    # 1.5 s is 1500 samples for d0 (but at most twice the 20 steps of the full work), 750 for
    # d1 (7 epochs and one batch), 375 for d2, 187 for d3
    assert steps == {"d0": 40, "d1": 29, "d2": 14, "d3": 6}
    for d, task in plan.tasks.items():
        assert task.max_steps == steps[d] and task.epochs == math.ceil(steps[d] / 4)
        assert plan.workloads[d].predicted_s <= plan.budget_s + 1e-9
    assert plan.deadline - time.time() == pytest.approx(1.5 * 1.5, abs=0.05)
    # a device too slow for min_work_fraction of the work sits the round out
    _device(reg, "snail", sps=5.0)
    plan = _scheduler(reg, budget_quantile=0.5, deadline_s=60.0).plan(2, 0)
    assert "snail" not in plan.participants and "fit in" in plan.left_out["snail"]


def test_unknown_devices_probe_and_the_round_gets_the_full_deadline():
    reg = DeviceRegistry()
    _device(reg, "new")
    _device(reg, "known", sps=500.0)
    plan = _scheduler(reg, deadline_s=30.0, probe_epochs=1).plan(1, 0)
    assert plan.workloads["new"].probe and plan.step_caps["new"] == 4
    assert not plan.workloads["known"].probe
    assert plan.deadline - time.time() == pytest.approx(30.0, abs=0.05)


def test_slow_links_get_the_more_compressed_codec():
    reg = DeviceRegistry()
    _device(reg, "fiber", sps=500.0)
    _device(reg, "modem", sps=500.0, link_kbps=1000.0)
    # 10,000 weights in the envelope devices send (zstd on): about 37 KB dense (0.30 s at
    # 1,000 kbit/s), 18 KB in fp16 (0.15 s)
    spec = {"w": (100, 100)}
    sched = _scheduler(reg, spec, codecs=["dense_fp32", "fp16"], budget_s=1.0, upload_share=0.25)
    plan = sched.plan(1, 0)
    assert plan.tasks["fiber"].codec.name == "dense_fp32"
    assert plan.tasks["modem"].codec.name == "fp16"
    assert sched.payload_bytes({"name": "fp16"}) < sched.payload_bytes({"name": "dense_fp32"})
    # the upload's time comes out of the modem's compute time: about 425 samples, not 500
    assert (plan.step_caps["modem"], plan.step_caps["fiber"]) == (16, 20)
    with pytest.raises(ConfigError):
        _scheduler(reg, codecs=["no-such-codec"])


def test_battery_floor_and_battery_sized_work():
    reg = DeviceRegistry()
    _device(reg, "low", sps=500.0, battery=15.0)
    _device(reg, "low-charging", sps=500.0, battery=15.0, charging=True)
    _device(reg, "mains", sps=500.0)
    # 1 Wh = 3600 J, 1 % = 36 J: "near" has 0.36 J above the floor, which at 2 W and 500
    # samples/s is 90 samples: two batches of 32
    _device(reg, "near", sps=500.0, battery=20.01)
    for workload in ("uniform", "adaptive"):
        sched = _scheduler(reg, workload=workload, battery_floor_pct=20.0, budget_s=1.0)
        assert sched.eligible() == ["low-charging", "mains", "near"]
    whole = {"battery_floor_pct": 20.0, "budget_s": 1.0, "battery_share": 1.0}
    plan = _scheduler(reg, min_work_fraction=0.0, **whole).plan(1, 0)
    assert plan.step_caps["near"] == 2 and plan.step_caps["mains"] == 20
    plan = _scheduler(reg, min_work_fraction=0.5, **whole).plan(1, 0)
    assert "near" not in plan.participants and "battery" in plan.left_out["near"]
    # spending a fifth of what is above the floor per round: 18 samples, not a single step
    _device(reg, "fuller", sps=500.0, battery=20.05)  # 1.8 J above: 0.36 J a round, 2 steps
    plan = _scheduler(reg, battery_floor_pct=20.0, budget_s=1.0, battery_share=0.2).plan(1, 0)
    assert "near" not in plan.participants and plan.step_caps["fuller"] == 2


def test_a_charging_device_whose_work_outdraws_its_charger_keeps_the_floor():
    reg = DeviceRegistry()
    # 2 W training (POWER) against chargers of 5 W (never drains), 1 W (drains 1 W net) and
    # an unknown one (a real device: plugged in counts as not draining)
    _device(reg, "strong-low", sps=500.0, battery=15.0, charging=True, charge_w=5.0)
    _device(reg, "weak-low", sps=500.0, battery=15.0, charging=True, charge_w=1.0)
    _device(reg, "weak-near", sps=500.0, battery=20.01, charging=True, charge_w=1.0)
    _device(reg, "plugged-low", sps=500.0, battery=15.0, charging=True)
    whole = {"battery_floor_pct": 20.0, "budget_s": 1.0, "battery_share": 1.0}
    sched = _scheduler(reg, min_work_fraction=0.0, **whole)
    # the pick rule is unchanged: under the floor but charging is eligible ...
    assert sched.eligible() == ["plugged-low", "strong-low", "weak-low", "weak-near"]
    plan = sched.plan(1, 0)
    # ... but no work may take a battery further under it
    assert "weak-low" not in plan.participants
    assert "charging at 1 W" in plan.left_out["weak-low"]
    assert plan.step_caps["strong-low"] == 20 and plan.step_caps["plugged-low"] == 20
    # 0.36 J above the floor at 1 W net is 0.36 s of training: 180 samples, an epoch of 100
    # (4 steps) and two batches of 32 (at the full 2 W it would be two steps in all, see
    # test_battery_floor_and_battery_sized_work)
    assert plan.step_caps["weak-near"] == 6
    # a charging battery that work drains ranks by its level, after a device on mains (the
    # names would put it first)
    _device(reg, "zz-mains", sps=500.0)
    ranked = sched._rank([reg.get("weak-near"), reg.get("zz-mains")])
    assert [r.device_id for r in ranked] == ["zz-mains", "weak-near"]
    assert reg.get("weak-near").net_draw_w() == (1.0, 0.0)
    assert reg.get("strong-low").net_draw_w() is None
    assert reg.get("plugged-low").net_draw_w() is None


def test_adaptive_batch_size_follows_free_memory_and_samples():
    spec = model_spec(build_model("mlp_digits"))
    # 9,610 parameters x 4 copies x 4 bytes, 2 x (64+128 + 128+10) values x 4 bytes a sample,
    # and the shuffled data: 100 samples x (64 x 4 + 8) bytes
    assert training_memory_bytes(spec, 32, 100) == 4 * (4 * 9610 + 2 * 330 * 32) + 100 * 264
    need = {b: training_memory_bytes(spec, b, 100) for b in (8, 16, 32)}
    mb = 2**20
    reg = DeviceRegistry()
    _device(reg, "roomy", sps=500.0)  # 100 MB free
    # half its free memory (memory_share 0.5) holds batch 16, not 32
    _device(reg, "tight", sps=500.0, mem_mb=2 * (need[16] + need[32]) / 2 / mb)
    # not even batch 8
    _device(reg, "starved", sps=500.0, mem_mb=2 * (need[8] - 1) / mb)
    _device(reg, "few", sps=500.0, samples=20)  # a batch of 32 would be its 20 samples
    sched = _scheduler(reg, spec, budget_s=1.0, max_work_factor=1.0, min_batch_size=8)
    plan = sched.plan(1, 0)
    batch = {d: plan.tasks[d].batch_size for d in plan.participants}
    assert batch == {"roomy": 32, "tight": 16, "few": 20}
    assert "memory" in plan.left_out["starved"] and "batch 8" in plan.left_out["starved"]
    # steps are counted in each device's own batch: the full work is 5 epochs of 100 samples,
    # 4 batches of 32 or 7 of 16 an epoch; FedNova's caps are these steps
    assert plan.step_caps["roomy"] == 20 and plan.step_caps["tight"] == 35
    assert plan.tasks["tight"].max_steps == 35 and plan.workloads["tight"].batch_size == 16
    # the same samples take the same time: steps x batch = samples
    assert plan.workloads["tight"].predicted_s == pytest.approx(plan.workloads["roomy"].predicted_s)
    assert samples_for_steps(100, 16, 35) == samples_for_steps(100, 32, 20) == 500
    # a budget that holds 150 samples: an epoch and one more batch of 32 (5 steps, 132
    # samples), or an epoch and three more of 16 (10 steps, 148 samples)
    plan = _scheduler(reg, spec, budget_s=0.3, min_batch_size=8).plan(2, 0)
    assert (plan.step_caps["roomy"], plan.step_caps["tight"]) == (5, 10)
    # uniform workloads keep the [train] batch size, whatever the memory
    plan = _scheduler(reg, spec, workload="uniform").plan(3, 0)
    assert {t.batch_size for t in plan.tasks.values()} == {32}
    with pytest.raises(ConfigError):
        _scheduler(reg, spec, memory_share=0.0)


def test_link_estimator_ignores_small_uploads_and_smooths():
    est = LinkEstimator(min_bytes=10_000, smoothing=0.5)
    assert est.kbps is None
    # 1 KB in 10 ms is mostly round trip: it would say 800 kbit/s of a far faster link
    assert not est.observe(1_000, 0.01) and est.kbps is None
    assert est.observe(100_000, 0.1)  # 8 Mbit/s
    assert est.kbps == pytest.approx(8000.0)
    est.observe(100_000, 0.2)  # 4 Mbit/s
    assert est.kbps == pytest.approx(6000.0)
    # a real device: measured unless its profile fixes the bandwidth; a simulated one never
    real = Hardware(ProfileConfig(link_min_bytes=10_000))
    assert real.measures_link and real.telemetry(5).link_kbps is None
    real.observe_upload(50_000, 0.05)
    assert real.telemetry(5).link_kbps == pytest.approx(8000.0)
    assert real.expected_upload_s(1_000_000) == pytest.approx(1.0)
    fixed = Hardware(ProfileConfig(link_kbps=250.0))
    fixed.observe_upload(50_000, 0.05)
    assert not fixed.measures_link and fixed.telemetry(5).link_kbps == 250.0
    simulated = SimulatedHardware(sim())
    simulated.observe_upload(50_000, 0.05)
    assert not simulated.measures_link and simulated.telemetry(5).link_kbps is None


def test_floor_violations_count_charging_devices_whose_work_drains_them():
    def worked(joules: float, seconds: float, **profile) -> dict:
        hw = SimulatedHardware(sim(battery_wh=0.01, compute_w=5.0, **profile))  # 36 J = 100 %
        hw.spend(joules, seconds)
        return hw.report()

    hardware = {
        # B3's dev-08: charging at 10 % with 2 W against a 5 W draw: 3.6 J over 1 s is 10 %
        # out, 2 J (5.6 %) in
        "weak-charger": worked(3.6, 1.0, battery_pct=10.0, charging=True, charge_w=2.0),
        "strong-charger": worked(3.6, 1.0, battery_pct=10.0, charging=True, charge_w=5.0),
        "on-battery": worked(0.72, 0.1, battery_pct=21.0),  # 21 % to 19 %
        "above": worked(0.72, 0.1, battery_pct=50.0),
        "mains": worked(3.6, 1.0),
    }
    assert hardware["weak-charger"]["lowest_after_work_pct"] < 10.0
    assert hardware["strong-charger"]["lowest_after_work_pct"] is None
    assert floor_violations(hardware, 20.0) == ["on-battery", "weak-charger"]
    assert floor_violations(hardware, 0.0) == []


def test_the_agent_declines_work_its_charger_cannot_pay_for(digits, tmp_path):
    train, _ = digits
    data = Dataset(train.X[:100], train.y[:100])

    def agent(**profile) -> DeviceAgent:
        # 100 samples/s at 5 W: one epoch of 100 samples is 1 s and 5 J; 0.01 Wh is 36 J
        base = {"base_sps": 100.0, "compute_w": 5.0, "battery_wh": 0.01}
        cfg = DeviceConfig(state_dir=str(tmp_path), profile=sim(**(base | profile)))
        return DeviceAgent(cfg, data)

    task = Task(1, 0, 1, 32, 0.1, {"name": "dense_fp32"}, time.time() + 60)
    # 25 %: 5 J less 1 J charged is 11 %, to 14 %, under the floor of 20 %
    weak = agent(battery_pct=25.0, charging=True, charge_w=1.0)
    assert "while charging, under the floor of 20%" in weak._refusal(task)
    assert agent(battery_pct=25.0, charging=True, charge_w=5.0)._refusal(task) is None
    # under the floor, charging: declines any work that drains it, even before it knows its
    # speed; accepts work its charger more than pays for
    assert "is under the floor" in agent(battery_pct=15.0, charging=True, charge_w=1.0)._refusal(
        task
    )
    assert agent(battery_pct=15.0, charging=True, charge_w=6.0)._refusal(task) is None
    assert agent(battery_pct=90.0)._refusal(task) is None
    # the task's batch size is what the estimate counts, and what training uses
    assert weak._refusal(dataclasses.replace(task, max_steps=1, batch_size=8)) is None


def test_overcommit_asks_more_and_closes_when_enough_reported():
    reg = DeviceRegistry()
    for i in range(10):
        _device(reg, f"d{i}", sps=500.0)
    plan = _scheduler(reg, overcommit=0.25, participants=4, budget_s=1.0).plan(1, 0)
    assert len(plan.participants) == 5 and plan.enough == 4
    plan = _scheduler(reg, overcommit=0.1, budget_s=1.0).plan(1, 0)
    assert len(plan.participants) == 10 and plan.enough == 10  # ceil(10 / 1.1)
    plan = _scheduler(reg, overcommit=0.25, budget_s=1.0).plan(1, 0)
    assert plan.enough == 8
    assert _scheduler(reg, workload="uniform", budget_s=1.0).plan(1, 0).enough is None

    ones = {k: np.ones(s, np.float32) for k, s in SPEC.items()}
    rnd = Round(1, 0, ["a", "b", "c"], time.time() + 5, SPEC, enough=2)
    rnd.offer(Update("a", 1, 0, 10, ones), 1)
    rnd.offer(Update("b", 1, 0, 10, ones), 1)
    assert rnd.wait(lambda _d: True) == "enough"
    # the rest get a grace of enough_grace times what the needed ones took
    for late_by, expected in ((0.05, "all_reported"), (None, "enough")):
        rnd = Round(1, 0, ["a", "b", "c"], time.time() + 5, SPEC, enough=2, enough_grace=1.0)
        time.sleep(0.2)
        rnd.offer(Update("a", 1, 0, 10, ones), 1)
        rnd.offer(Update("b", 1, 0, 10, ones), 1)
        if late_by is not None:
            threading.Timer(late_by, rnd.offer, (Update("c", 1, 0, 10, ones), 1)).start()
        started = time.monotonic()
        assert rnd.wait(lambda _d: True, poll_s=0.01) == expected
        assert time.monotonic() - started < (0.15 if late_by else 0.35)
    # a declined participant is no longer waited for
    rnd = Round(1, 0, ["a", "b"], time.time() + 5, SPEC)
    rnd.offer(Update("a", 1, 0, 10, ones), 1)
    assert rnd.withdraw("b", "declined") and not rnd.withdraw("b", "declined")
    assert rnd.wait(lambda _d: True) == "all_reported"


def test_registry_tracks_silence_throughput_latency_and_reliability():
    reg = DeviceRegistry(smoothing=0.5)
    _device(reg, "a")
    reg.on_work("a", {"samples_seen": 400, "train_s": 2.0}, turnaround_s=2.5)
    reg.on_work("a", {"samples_seen": 400, "train_s": 1.0, "battery_pct": 40.0, "charging": 0.0})
    rec = reg.get("a")
    assert rec.throughput_sps == pytest.approx(300.0)  # 0.5 * 400 + 0.5 * 200
    assert rec.latency_s == pytest.approx(0.5)
    assert (rec.battery_pct, rec.charging) == (40.0, False)
    reg.on_assigned(["a"] * 4)
    reg.on_missed(["a"])
    reg.on_declined("a", "battery")
    assert rec.reliability == pytest.approx(1 - 1 / 3) and rec.declines == 1
    # silence: offline, back with its next telemetry
    time.sleep(0.05)
    assert reg.sweep(max_age_s=0.01) == ["a"]
    assert not reg.is_online("a") and rec.offline_reason == "silent"
    reg.on_telemetry("a", Telemetry(1.0, 100.0, 100))
    assert reg.is_online("a")
    # a Last Will needs a new birth: late telemetry does not bring the device back
    reg.on_status("a", Status("offline"))
    reg.on_telemetry("a", Telemetry(1.0, 100.0, 100))
    assert not reg.is_online("a") and rec.offline_reason == "will"


# ---------------------------------------------------------------------------------------------
# over the real broker


def _adaptive(cfg: AggregatorConfig) -> AggregatorConfig:
    cfg.schedule.workload = "adaptive"
    cfg.train.epochs = 1
    return cfg


@pytest.mark.parametrize("workload", ["uniform", "adaptive"])
def test_a_device_under_its_battery_floor_is_not_picked_unless_charging(make_fleet, workload):
    fleet = make_fleet(devices=4)
    fleet.start_agent(0, profile=sim(battery_pct=15.0))
    # charging at 5 W: more than its work draws (3 W training, 1 W radio)
    fleet.start_agent(1, profile=sim(battery_pct=15.0, charging=True, charge_w=5.0))
    fleet.start_agent(2)
    # charging at 2 W, less than training draws: work would take it further under the floor
    weak = fleet.start_agent(3, profile=sim(battery_pct=15.0, charging=True, charge_w=2.0))
    cfg = fleet.aggregator_config(rounds=1, battery_floor_pct=20.0)
    cfg.schedule.workload = workload
    with fleet.aggregator(cfg) as agg:
        (m,) = agg.run()
    assert m.reported == 2 and m.applied
    assert fleet.agents["dev-0"].stats.tasks_received == 0
    assert fleet.agents["dev-1"].stats.updates_sent == 1
    if workload == "adaptive":
        # the aggregator knows its charging power from its birth and leaves it out
        assert m.participants == 2 and "charging at 2 W" in m.left_out["dev-3"]
        assert weak.stats.tasks_received == 0
    else:
        # uniform work is not sized to batteries: the device guards itself
        assert m.participants == 3 and m.withdrawn == {"dev-3": "declined"}
        assert weak.stats.replies == {"declined": 1} and weak.stats.updates_sent == 0
    assert weak.hardware.lowest_after_work_pct is None  # no work took it lower


def test_a_device_that_declines_is_replaced(make_fleet):
    fleet = make_fleet(devices=3)
    # The aggregator's floor is 20 %, so dev-0 at 50 % looks fine to it; but dev-0 keeps its own
    # floor at 60 % and declines. The scheduler prefers the device on mains, then the fuller
    # battery: dev-1 and dev-0 are asked first, dev-2 is the replacement.
    fleet.start_agent(0, profile=sim(battery_pct=50.0), battery_floor_pct=60.0)
    fleet.start_agent(1)
    fleet.start_agent(2, profile=sim(battery_pct=40.0))
    cfg = _adaptive(fleet.aggregator_config(rounds=1, participants=2, battery_floor_pct=20.0))
    with fleet.aggregator(cfg) as agg:
        (m,) = agg.run()
        rec = agg.registry.get("dev-0")
    assert m.withdrawn == {"dev-0": "declined"} and m.replaced == {"dev-0": "dev-2"}
    assert m.reported == 2 and m.applied and m.closed_by == "all_reported"
    assert m.missing == []
    assert rec.declines == 1 and "under the floor of 60%" in rec.last_decline
    assert rec.reliability == 1.0  # a decline is policy, not unreliability
    assert fleet.agents["dev-0"].stats.replies == {"declined": 1}
    assert fleet.agents["dev-0"].hardware.battery()[0] == 50.0  # it did no work
    assert fleet.agents["dev-2"].stats.updates_sent == 1


def test_a_silent_device_is_marked_offline_and_left_out_of_the_next_round(make_fleet):
    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i, telemetry_interval_s=0.2) for i in range(3)]
    cfg = fleet.aggregator_config(rounds=2, telemetry_max_age_s=1.0)
    with fleet.aggregator(cfg) as agg:
        (m1,) = agg.run(rounds=1)
        assert m1.participants == 3
        # dev-2 stays connected (so no Last Will) but says nothing more
        agents[2]._publish_telemetry = lambda: None
        time.sleep(1.3)
        (m2,) = agg.run(rounds=2)[1:]
        rec = agg.registry.get("dev-2")
        assert not rec.online and rec.offline_reason == "silent"
        assert agents[2].link.connected.is_set()
    assert m2.participants == 2 and m2.reported == 2
    assert agents[2].stats.tasks_received == 1


def test_a_device_whose_will_fires_is_left_out_of_the_next_round(make_fleet):
    fleet = make_fleet(devices=3)
    agents = [fleet.start_agent(i) for i in range(3)]
    with fleet.aggregator(fleet.aggregator_config(rounds=2)) as agg:
        agg.run(rounds=1)
        agents[1].crash()
        wait_until(lambda: not agg.registry.is_online("dev-1"), what="dev-1's Will")
        agg.cfg.rounds.min_devices = 2  # do not wait for dev-1 to come back
        (m2,) = agg.run(rounds=2)[1:]
        assert agg.registry.get("dev-1").offline_reason == "will"
    assert m2.participants == 2 and m2.reported == 2
    assert agents[1].stats.tasks_received == 1


def test_simulated_devices_take_real_time_report_energy_and_give_up_at_the_deadline(make_fleet):
    fleet = make_fleet(devices=2)
    n0 = len(fleet.data[0])
    # one epoch: dev-0 trains at 2,000 samples/s; dev-1 at 10 samples/s, far past the deadline
    fleet.start_agent(0, profile=sim(base_sps=2000.0, battery_pct=90.0, battery_wh=0.01))
    fleet.start_agent(1, profile=sim(base_sps=10.0))
    cfg = fleet.aggregator_config(rounds=1, deadline_s=1.5)
    cfg.train.epochs = 1
    with fleet.aggregator(cfg) as agg:
        started = time.monotonic()
        (m,) = agg.run()
        took = time.monotonic() - started
        rec0, rec1 = agg.registry.get("dev-0"), agg.registry.get("dev-1")
        # dev-1 works until the deadline, then says it gave up and what that cost
        wait_until(lambda: rec1.energy_j > 0, what="dev-1's reply")
    assert m.reported == 1 and m.missing == ["dev-1"]
    assert 1.5 <= took < 3.0
    assert fleet.agents["dev-1"].stats.replies == {"late": 1}
    assert rec1.deadlines_missed == 1
    assert rec1.energy_j == pytest.approx(1.5 * 3.0, rel=0.2)  # 1.5 s of CPU at 3 W
    # dev-0's training took the profile's time, which its measured throughput shows
    assert rec0.throughput_sps == pytest.approx(2000.0, rel=0.1)
    assert m.battery_pct["dev-0"] < 90.0
    # energy estimate: CPU seconds x 3 W (the default power model)
    assert m.energy_by_device["dev-0"] == pytest.approx(n0 / 2000 * 3.0, rel=0.2)


def test_overcommit_closes_without_the_straggler_whose_next_task_supersedes_its_work(make_fleet):
    fleet = make_fleet(devices=3)
    fleet.start_agent(0)
    fleet.start_agent(1)
    slow = fleet.start_agent(2, profile=sim(base_sps=20.0))  # one epoch takes it many seconds
    cfg = fleet.aggregator_config(rounds=2, overcommit=0.5)  # 3 asked, 2 needed
    cfg.train.epochs = 1
    with fleet.aggregator(cfg) as agg:
        m1, m2 = agg.run()
        rec = agg.registry.get("dev-2")
        # round 2's task made dev-2 drop round 1's work and say so, with what it had cost
        wait_until(lambda: slow.stats.replies.get("superseded") == 1, what="the superseded reply")
        wait_until(lambda: rec.throughput_sps is not None, what="dev-2's measured speed")
    for m in (m1, m2):
        assert (m.participants, m.reported, m.closed_by) == (3, 2, "enough")
        assert m.missing == ["dev-2"] and m.applied
    assert m1.wall_s < 3.0
    assert rec.deadlines_missed == 0  # cut by overcommit, not late
    assert rec.throughput_sps == pytest.approx(20.0, rel=0.25)
    assert rec.energy_j > 0


def _watch_updates(broker) -> tuple[MqttLink, dict[str, bytes]]:
    """A read-only link that sees every update as the broker passes it on."""
    seen: dict[str, bytes] = {}

    def on_update(topic: str, payload: bytes) -> None:
        seen[topic.split("/")[-2]] = payload

    watcher = MqttLink("test-watcher", broker.broker_config(broker.monitor), clean_start=True)
    watcher.subscribe(f"edgefl/{FLEET}/devices/+/update", on_update)
    return watcher, seen


def test_a_low_memory_device_gets_a_smaller_batch_and_trains_with_it(make_fleet, broker):
    fleet = make_fleet(devices=2)
    spec = model_spec(build_model("mlp_digits"))
    n0, n1 = len(fleet.data[0]), len(fleet.data[1])
    assert n0 > 8 and n1 > 32
    # free memory of which half holds training at batch 8 and no more
    mem_mb = 2 * (training_memory_bytes(spec, 8, n0) + 100) / 2**20
    fleet.start_agent(0, profile=sim(mem_available_mb=mem_mb))
    fleet.start_agent(1)
    cfg = _adaptive(fleet.aggregator_config(rounds=1))
    cfg.strategy.fednova = True
    watcher, seen = _watch_updates(broker)
    with watcher, fleet.aggregator(cfg) as agg:
        (m,) = agg.run()
        wait_until(lambda: len(seen) == 2, what="both updates at the watcher")
    assert m.reported == 2 and m.applied
    got = {d: decode_update(p, topic_device_id=d, spec=spec) for d, p in seen.items()}
    # one probe epoch each, in the batch size its task gave it
    assert got["dev-0"].metrics["steps"] == local_steps(n0, 1, 8)
    assert got["dev-1"].metrics["steps"] == local_steps(n1, 1, 32)
    assert got["dev-0"].metrics["samples_seen"] == n0
    # FedNova weighed each update by the steps its task allowed (held to the caps)
    p0 = n0 / (n0 + n1)
    expected = p0 * local_steps(n0, 1, 8) + (1 - p0) * local_steps(n1, 1, 32)
    assert m.effective_steps == pytest.approx(expected)


def test_a_real_device_measures_its_uplink_and_reports_it(make_fleet):
    fleet = make_fleet(devices=2)
    # a real device (no simulated profile), and one whose profile fixes its link
    real = fleet.start_agent(0)
    fixed = fleet.start_agent(1, profile=ProfileConfig(link_kbps=300.0))
    assert real._read_telemetry(real).link_kbps is None  # nothing measured yet
    cfg = fleet.aggregator_config(rounds=1)
    with fleet.aggregator(cfg) as agg:
        (m,) = agg.run()
        assert m.reported == 2
        # mlp_digits dense: about 38 KB, over the 16 KB below which an upload says nothing
        wait_until(lambda: real.hardware.uplink.kbps is not None, what="the PUBACK timed")
        kbps = real._read_telemetry(real).link_kbps
        assert kbps is not None and kbps > 0
        # the next telemetry carries it to the aggregator, whose scheduler sizes uploads by it
        wait_until(
            lambda: (agg.registry.get("dev-0").link_kbps or 0) > 0,
            what="link_kbps at the aggregator",
        )
        assert agg.registry.get("dev-1").link_kbps == 300.0
    assert fixed.hardware.uplink.kbps is None  # fixed: not measured
