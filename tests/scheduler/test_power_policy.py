"""The power controller (services/scheduler/policies/power.py): POLCA's two thresholds with priority, the
emergency cap, hysteresis to uncap, and the SLO-aware clock; table-driven cases, then properties."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.gpu_power import H100_SXM, StepCost
from services.scheduler.policies.power import (
    GpuInstance,
    PowerCap,
    PowerConfig,
    PowerLevel,
    PowerState,
    decide,
    power_level,
    predicted_watts,
    slo_clock,
)

BUDGET = 4000.0
CONFIG = PowerConfig(budget_watts=BUDGET, uncap_after_s=30.0, tpot_slo_s=0.05)
DECODE_STEP = StepCost(compute_s=0.012, memory_s=0.020, overhead_s=0.002)      # memory-bound: 22 ms


def gpu(iid: str, pool: str, watts: float, step: StepCost | None = DECODE_STEP, can_cap: bool = True):
    return GpuInstance(iid, pool, watts, step if pool != "prefill" else None, can_cap)


def cluster(watts_each: float) -> tuple[GpuInstance, ...]:
    """Three prefill and three decode GPUs drawing the same."""
    return tuple(gpu(f"{pool[0]}{n}", pool, watts_each) for pool in ("prefill", "decode") for n in range(3))


def capped(decision) -> dict[str, float]:
    return {c.instance_id: c.clock_mhz for c in decision.caps}


@pytest.mark.parametrize(("total", "level"), [
    (3000, PowerLevel.NORMAL), (3600, PowerLevel.NORMAL), (3700, PowerLevel.THRESHOLD1),
    (3850, PowerLevel.THRESHOLD2), (4000, PowerLevel.THRESHOLD2), (4001, PowerLevel.EMERGENCY)])
def test_levels(total, level):
    assert power_level(CONFIG, total) is level


def test_below_threshold1_nothing_is_capped():
    decision, state = decide(CONFIG, cluster(550), PowerState(), now=0)      # 3300 W
    assert decision.level is PowerLevel.NORMAL and decision.caps == () and state.calm_since == 0


def test_threshold1_caps_the_decode_pool_alone_at_its_slo_clock():
    decision, _ = decide(CONFIG, cluster(620), PowerState(), now=0)          # 3720 W > T1 (3600)
    assert decision.level is PowerLevel.THRESHOLD1
    clock = slo_clock(CONFIG, cluster(620)[3])
    assert capped(decision) == {"d0": clock, "d1": clock, "d2": clock}
    assert {c.reason for c in decision.caps} == {"threshold1"}
    assert DECODE_STEP.seconds_at(H100_SXM.clock_ratio(clock)) <= CONFIG.tpot_slo_s
    lower = clock - H100_SXM.clock_step_mhz
    assert DECODE_STEP.seconds_at(H100_SXM.clock_ratio(lower)) > CONFIG.tpot_slo_s
    assert all(c.watts == H100_SXM.power_limit_for(clock) for c in decision.caps)


def light_prefill(prefill_watts: float, decode_watts: float) -> tuple[GpuInstance, ...]:
    return tuple(gpu(f"p{n}", "prefill", prefill_watts) for n in range(3)) + \
        tuple(gpu(f"d{n}", "decode", decode_watts) for n in range(3))


def test_threshold2_caps_high_priority_too_prefill_at_its_utilization_clock():
    instances = light_prefill(400, 700)                                      # 3300 W: budget 3400, T2 3230
    decision, _ = decide(dataclasses.replace(CONFIG, budget_watts=3400), instances, PowerState(), now=0)
    assert decision.level is PowerLevel.THRESHOLD2
    caps = capped(decision)
    assert set(caps) == {"p0", "p1", "p2", "d0", "d1", "d2"}
    # compute-bound: at the cap its busy share grows by f_max / f and stays within the limit, one step
    # lower it would not
    busy = H100_SXM.utilization_at(instances[0].power_watts)
    assert busy * H100_SXM.max_clock_mhz / caps["p0"] <= CONFIG.prefill_max_utilization
    assert busy * H100_SXM.max_clock_mhz / (caps["p0"] - H100_SXM.clock_step_mhz) > CONFIG.prefill_max_utilization


def test_a_saturated_prefill_gpu_is_not_capped_before_an_emergency():
    saturated = light_prefill(H100_SXM.peak_watts, 600)                      # 3900 W > T2 (3800)
    decision, _ = decide(CONFIG, saturated, PowerState(), now=0)
    assert decision.level is PowerLevel.THRESHOLD2
    assert not {"p0", "p1", "p2"} & set(capped(decision))


def test_which_pools_are_low_priority_is_configurable():
    config = PowerConfig(budget_watts=3000, low_priority_pools=frozenset({"prefill"}))
    decision, _ = decide(config, light_prefill(400, 510), PowerState(), now=0)   # 2730 W: T1 2700, T2 2850
    assert set(capped(decision)) == {"p0", "p1", "p2"}


def test_emergency_caps_everything_to_a_clock_whose_predicted_total_fits():
    instances = cluster(700)                                                 # 4200 W > budget
    decision, _ = decide(CONFIG, instances, PowerState(), now=0)
    assert decision.level is PowerLevel.EMERGENCY
    caps = capped(decision)
    assert set(caps) == {i.instance_id for i in instances} and len(set(caps.values())) == 1
    predicted = sum(predicted_watts(CONFIG, i, None, caps[i.instance_id]) for i in instances)
    assert predicted <= CONFIG.emergency_target * BUDGET
    assert {c.reason for c in decision.caps} == {"emergency"}


def test_read_only_gpus_count_but_are_never_capped():
    instances = (*cluster(620)[:3], *(gpu(f"d{n}", "decode", 620, can_cap=False) for n in range(3)))
    decision, _ = decide(CONFIG, instances, PowerState(), now=0)
    assert decision.level is PowerLevel.THRESHOLD1 and decision.caps == ()


def test_hysteresis_uncaps_high_priority_first_then_low_after_another_wait():
    caps = (PowerCap("p0", "prefill", 1410, 400, "threshold2"), PowerCap("d0", "decode", 900, 300, "threshold1"))
    quiet = (gpu("p0", "prefill", 300), gpu("d0", "decode", 300))           # 600 W: far below T1
    state = PowerState(caps)
    decision, state = decide(CONFIG, quiet, state, now=100)
    assert capped(decision) == {"p0": 1410, "d0": 900} and state.calm_since == 100
    decision, state = decide(CONFIG, quiet, state, now=129)
    assert set(capped(decision)) == {"p0", "d0"}
    decision, state = decide(CONFIG, quiet, state, now=130)
    assert set(capped(decision)) == {"d0"} and decision.changed_ids == ("p0",)
    decision, state = decide(CONFIG, quiet, state, now=159)
    assert set(capped(decision)) == {"d0"}
    decision, state = decide(CONFIG, quiet, state, now=160)
    assert decision.caps == () and decision.changed_ids == ("d0",)


def test_the_wait_restarts_when_power_rises_into_the_band():
    caps = (PowerCap("d0", "decode", 900, 300, "threshold1"),)
    state = PowerState(caps, calm_since=0)
    band = (gpu("d0", "decode", 3500),)                        # below T1 (3600), above T1 - margin (3400)
    decision, state = decide(CONFIG, band, state, now=50)
    assert set(capped(decision)) == {"d0"} and state.calm_since is None


def test_no_uncap_when_the_prediction_would_cross_threshold1():
    caps = tuple(PowerCap(f"d{n}", "decode", 345, 200, "emergency") for n in range(6))
    busy = tuple(gpu(f"d{n}", "decode", 500, step=None) for n in range(6))   # 3000 W at 345 MHz
    decision, _state = decide(CONFIG, busy, PowerState(caps, calm_since=0), now=1000)
    assert len(decision.caps) == 6


def test_a_cap_missing_the_slo_after_load_grew_is_raised_below_threshold1():
    heavy = StepCost(compute_s=0.02, memory_s=0.03, overhead_s=0.002)
    state = PowerState((PowerCap("d0", "decode", 600, 250, "threshold1"),))
    decision, _ = decide(CONFIG, (gpu("d0", "decode", 300, step=heavy),), state, now=0)
    raised = capped(decision).get("d0", H100_SXM.max_clock_mhz)
    assert raised > 600 and heavy.seconds_at(H100_SXM.clock_ratio(raised)) <= CONFIG.tpot_slo_s


def test_unknown_instances_lose_their_caps_and_the_input_is_not_mutated():
    state = PowerState((PowerCap("gone", "decode", 900, 300, "threshold1"),))
    decision, _new_state = decide(CONFIG, cluster(500), state, now=0)
    assert decision.caps == () and decision.changed_ids == ("gone",)
    assert state.caps[0].instance_id == "gone"


@pytest.mark.parametrize("kwargs", [{"budget_watts": 0}, {"budget_watts": 1, "threshold1": 0.96},
                                    {"budget_watts": 1, "uncap_margin": 0.95}, {"budget_watts": 1, "tpot_slo_s": 0}])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        PowerConfig(**kwargs)


# ---- properties ------------------------------------------------------------------------------------------

POOLS = st.sampled_from(["prefill", "decode", "both"])
CLOCKS = st.sampled_from([None, *H100_SXM.clocks()[::10]])


@st.composite
def rounds(draw):
    n = draw(st.integers(1, 8))
    instances, caps = [], []
    for k in range(n):
        pool = draw(POOLS)
        step = None if pool == "prefill" else StepCost(draw(st.floats(0.0005, 0.08)), draw(st.floats(0.001, 0.08)),
                                                       0.001)
        instances.append(GpuInstance(f"i{k}", pool, draw(st.floats(60, 720)), step, draw(st.booleans())))
        clock = draw(CLOCKS)
        if clock is not None and clock < H100_SXM.max_clock_mhz:
            caps.append(PowerCap(f"i{k}", pool, clock, H100_SXM.power_limit_for(clock), "threshold1"))
    budget = draw(st.floats(300, 6000))
    calm = draw(st.one_of(st.none(), st.floats(0, 100)))
    return PowerConfig(budget_watts=budget, tpot_slo_s=0.05), tuple(instances), PowerState(tuple(caps), calm)


def clock_of(decision_or_state, iid: str) -> float:
    return next((c.clock_mhz for c in decision_or_state.caps if c.instance_id == iid), H100_SXM.max_clock_mhz)


@settings(max_examples=300, deadline=None)
@given(rounds())
def test_no_cap_is_raised_or_removed_while_power_is_above_threshold1(case):
    config, instances, state = case
    decision, _ = decide(config, instances, state, now=200)
    if decision.level is not PowerLevel.NORMAL:
        for i in instances:
            if i.can_cap:
                assert clock_of(decision, i.instance_id) <= clock_of(state, i.instance_id)


@settings(max_examples=300, deadline=None)
@given(rounds())
def test_high_priority_is_newly_capped_only_past_threshold2(case):
    config, instances, state = case
    decision, _ = decide(config, instances, state, now=200)
    for i in instances:
        newly = clock_of(decision, i.instance_id) < clock_of(state, i.instance_id)
        if newly and not config.is_low_priority(i.pool):
            assert decision.level in (PowerLevel.THRESHOLD2, PowerLevel.EMERGENCY)
        if newly:
            assert i.can_cap and decision.level is not PowerLevel.NORMAL


@settings(max_examples=300, deadline=None)
@given(rounds())
def test_at_threshold1_low_priority_is_at_or_below_its_slo_clock_and_high_is_untouched(case):
    config, instances, state = case
    decision, _ = decide(config, instances, state, now=200)
    if decision.level is PowerLevel.THRESHOLD1:
        for i in instances:
            if not i.can_cap:
                continue
            if config.is_low_priority(i.pool):
                assert clock_of(decision, i.instance_id) <= slo_clock(config, i)
            else:
                assert clock_of(decision, i.instance_id) == clock_of(state, i.instance_id)


@settings(max_examples=300, deadline=None)
@given(rounds())
def test_emergency_fits_the_target_unless_every_cappable_gpu_is_at_the_minimum(case):
    config, instances, state = case
    decision, _ = decide(config, instances, state, now=200)
    if decision.level is not PowerLevel.EMERGENCY:
        return
    predicted = sum(predicted_watts(config, i, clock_of(state, i.instance_id), clock_of(decision, i.instance_id))
                    if i.can_cap else i.power_watts for i in instances)
    at_floor = all(clock_of(decision, i.instance_id) == H100_SXM.min_clock_mhz for i in instances if i.can_cap)
    assert predicted <= config.emergency_target * config.budget_watts + 1e-6 or at_floor


@settings(max_examples=200, deadline=None)
@given(rounds())
def test_caps_never_leave_the_supported_range_and_decide_is_deterministic(case):
    config, instances, state = case
    first = decide(config, instances, state, now=200)
    assert first == decide(config, instances, state, now=200)
    for cap in first[0].caps:
        assert H100_SXM.min_clock_mhz <= cap.clock_mhz < H100_SXM.max_clock_mhz
        assert H100_SXM.min_power_limit_watts <= cap.watts <= H100_SXM.peak_watts
