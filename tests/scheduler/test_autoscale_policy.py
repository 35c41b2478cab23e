"""The pure autoscaling policy, the goodput model and the counter window: numbers in, decisions out."""
from __future__ import annotations

import pytest

from services.common.cluster import ClusterSnapshot, InstanceSpec, InstanceState, Role, WorkerLoad
from services.engine.sim_profile import SimProfile
from services.scheduler.autoscaler import Slo, pool_loads, pool_signals
from services.scheduler.policies.autoscale import (
    AutoscaleConfig,
    AutoscaleState,
    PoolBounds,
    PoolSignals,
    decide,
)
from services.scheduler.policies.capacity import (
    EngineShape,
    Workload,
    decode_batch,
    decode_goodput,
    decode_step_s,
    prefill_goodput,
)
from services.scheduler.telemetry import CounterWindow, promql_queries, totals_of

CONFIG = AutoscaleConfig(prefill=PoolBounds(1, 10), decode=PoolBounds(1, 10), scale_up_after_s=10,
                         scale_down_after_s=60)
H100 = SimProfile.load("llama3-8b-h100")


def run(signals: dict[str, PoolSignals], times, config=CONFIG):
    state, out = AutoscaleState(), []
    for t in times:
        decisions, state = decide(config, signals, state, t)
        out.append({d.pool: d for d in decisions})
    return out


def test_autoscale_sizes_each_pool_by_demand_over_goodput_with_headroom():
    signals = {"decode": PoolSignals(replicas=2, demand_rps=10.0, capacity_rps=2.0)}   # 10 * 1.2 / 2 = 6
    first, held = run(signals, [0.0, 10.0])
    assert (first["decode"].target, first["decode"].desired, first["decode"].reason) == (6, 2, "demand")
    assert held["decode"].desired == 6


def test_autoscale_scale_up_waits_for_its_duration_and_a_flap_restarts_the_timer():
    up = {"prefill": PoolSignals(replicas=2, demand_rps=10.0, capacity_rps=2.0)}
    flat = {"prefill": PoolSignals(replicas=2, demand_rps=1.5, capacity_rps=1.0)}       # target 2: steady
    state = AutoscaleState()
    for t, signals, desired in ((0, up, 2), (5, flat, 2), (8, up, 2), (17, up, 2), (18, up, 6)):
        decisions, state = decide(CONFIG, signals, state, t)
        assert decisions[0].desired == desired, t


def test_autoscale_scale_down_is_slow_and_one_replica_at_a_time():
    signals = {"decode": PoolSignals(replicas=5, demand_rps=1.0, capacity_rps=2.0)}     # target 1
    decisions = run(signals, [0, 30, 59, 60])
    assert [d["decode"].desired for d in decisions] == [5, 5, 5, 4]
    assert decisions[-1]["decode"].target == 1


def test_autoscale_slo_queue_and_kv_pressure_add_a_replica_and_block_scale_down():
    cases = [("decode", PoolSignals(replicas=3, demand_rps=1.0, capacity_rps=2.0, slo_attainment=0.80), "slo"),
             ("prefill", PoolSignals(replicas=3, waiting_per_instance=9.0), "queue"),
             ("decode", PoolSignals(replicas=3, kv_utilization=0.97), "kv")]
    for pool, signals, reason in cases:
        d = run({pool: signals}, [0.0, 10.0])[-1][pool]
        assert (d.target, d.desired, d.reason) == (4, 4, reason)
    healthy = PoolSignals(replicas=3, demand_rps=1.0, capacity_rps=2.0, slo_attainment=0.99, kv_utilization=0.5)
    assert run({"decode": healthy}, [0.0])[0]["decode"].target == 1


def test_autoscale_bounds_clamp_and_an_idle_pool_shrinks_to_its_minimum():
    config = AutoscaleConfig(decode=PoolBounds(2, 4), scale_up_after_s=0, scale_down_after_s=0, max_step_down=8)
    big = run({"decode": PoolSignals(replicas=3, demand_rps=100.0, capacity_rps=1.0)}, [0.0], config)[0]["decode"]
    idle = run({"decode": PoolSignals(replicas=3, demand_rps=0.0)}, [0.0], config)[0]["decode"]
    assert (big.desired, big.reason) == (4, "bounds")
    assert (idle.desired, idle.reason) == (2, "bounds")


def test_autoscale_without_data_changes_nothing():
    d = run({"decode": PoolSignals(replicas=3)}, [0.0, 1000.0])[-1]["decode"]
    assert (d.target, d.desired, d.reason) == (3, 3, "steady")


@pytest.mark.parametrize("kwargs", [{"attainment_target": 0}, {"headroom": 0.5}, {"max_step_down": 0},
                                    {"scale_up_after_s": -1}, {"kv_utilization_high": 1.5}])
def test_autoscale_config_refuses_nonsense(kwargs):
    with pytest.raises(ValueError):
        AutoscaleConfig(**kwargs)
    with pytest.raises(ValueError, match="min_replicas"):
        PoolBounds(3, 2)


def test_goodput_model_follows_the_profile_and_the_slo():
    w = Workload(prompt_tokens=1000, output_tokens=200)
    assert 0 < prefill_goodput(H100, w, 0.5) < prefill_goodput(H100, w, 2.0)
    assert prefill_goodput(H100, Workload(1_000_000, 1), 0.5) == 0.0        # one prompt alone misses the SLO
    roomy = EngineShape(num_blocks=1_000_000, max_num_seqs=4096)
    batch = decode_batch(H100, w, roomy, 0.03)
    assert decode_step_s(H100, w, batch) <= 0.03 < decode_step_s(H100, w, batch + 1)
    assert decode_batch(H100, w, EngineShape(num_blocks=760), 0.03) == 10      # KV bound: 76 blocks each
    assert decode_goodput(H100, w, roomy, 0.03) == pytest.approx(batch / (200 * decode_step_s(H100, w, batch)))


def test_counter_window_sums_increases_over_the_window_and_survives_a_reset():
    window = CounterWindow(window_s=10)
    for t, requests in ((0, 0), (5, 5), (10, 12), (15, 20), (20, 3)):       # a gateway restart at 20 s
        window.add(t, {"requests": requests})
    assert window.increase()["requests"] == 8 + 3          # (10, 15] and (15, 20]: the reset counts from 0
    assert window.span_s(20) == 10


EXPOSITION = """\
# TYPE ferry_gateway_requests counter
ferry_gateway_requests_total{endpoint="chat",status="200"} 7.0
ferry_gateway_requests_total{endpoint="chat",status="400"} 2.0
ferry_gateway_requests_total{endpoint="chat",status="503"} 1.0
# TYPE ferry_gateway_prompt_tokens counter
ferry_gateway_prompt_tokens_total 800.0
# TYPE ferry_gateway_generation_tokens counter
ferry_gateway_generation_tokens_total 160.0
# TYPE ferry_gateway_slo_requests counter
ferry_gateway_slo_requests_total{result="met",slo="ttft"} 6.0
ferry_gateway_slo_requests_total{result="missed",slo="ttft"} 1.0
ferry_gateway_slo_requests_total{result="met",slo="tpot"} 5.0
ferry_gateway_slo_requests_total{result="missed",slo="tpot"} 2.0
ferry_gateway_slo_requests_total{result="met",slo="all"} 5.0
"""


def test_scraped_totals_match_the_promql_definitions():
    totals = totals_of(EXPOSITION)
    assert totals == {"requests": 8.0, "prompt_tokens": 800.0, "generation_tokens": 160.0, "ttft_met": 6.0,
                      "ttft_total": 7.0, "tpot_met": 5.0, "tpot_total": 7.0}
    queries = promql_queries('namespace="ferry"')
    assert queries["requests"] == 'sum(ferry_gateway_requests_total{namespace="ferry",status!~"4.."})'
    assert queries["tpot_met"] == 'sum(ferry_gateway_slo_requests_total{namespace="ferry",slo="tpot",result="met"})'
    assert set(queries) == set(totals)


def instance(iid: str, role: Role, model: str = "m", **load) -> InstanceState:
    spec = InstanceSpec(iid, role, f"127.0.0.1:{len(iid)}", model, block_size=16, max_model_len=4096)
    return InstanceState(spec, WorkerLoad(num_blocks=1000, **load), last_heartbeat=0.0)


def test_autoscale_signals_from_counters_and_registry_load():
    snapshot = ClusterSnapshot(now=0.0, instances=(
        instance("p0", Role.PREFILL, num_waiting=4, num_free_blocks=1000),
        instance("d0", Role.DECODE, num_running=8, num_free_blocks=200),
        instance("d1", Role.DECODE, num_running=8, num_free_blocks=600),
        instance("d2", Role.DECODE, num_running=1, num_free_blocks=1000, draining=True)))
    loads = pool_loads(snapshot)
    assert (loads["decode"].replicas, loads["decode"].kv_utilization) == (2, pytest.approx(0.6))
    increase = {"requests": 60.0, "prompt_tokens": 60_000.0, "generation_tokens": 12_000.0,
                "ttft_met": 57.0, "ttft_total": 60.0, "tpot_met": 30.0, "tpot_total": 60.0}
    signals = pool_signals(increase, 30.0, [loads], H100, Slo(1.0, 0.05), max_num_seqs=256)
    assert signals["prefill"].demand_rps == 2.0 and signals["prefill"].waiting_per_instance == 4.0
    assert signals["prefill"].slo_attainment == 0.95 and signals["decode"].slo_attainment == 0.5
    w = Workload(1000, 200)
    assert signals["prefill"].capacity_rps == pytest.approx(prefill_goodput(H100, w, 1.0))
    assert signals["decode"].capacity_rps == pytest.approx(decode_goodput(H100, w, EngineShape(1000), 0.05))
    quiet = pool_signals(dict.fromkeys(increase, 0.0), 30.0, [loads], H100, Slo(1.0, 0.05), 256)
    assert quiet["decode"].demand_rps is None            # requests run but none finished: no demand data
    assert quiet["decode"].slo_attainment is None and quiet["decode"].capacity_rps is None


def test_autoscale_recommendation_holds_while_the_new_replicas_start():
    config = AutoscaleConfig(decode=PoolBounds(1, 10), scale_up_after_s=0, scale_down_after_s=0)
    state = AutoscaleState()
    missing = {"decode": PoolSignals(replicas=2, slo_attainment=0.5)}       # SLO missed: one more
    for _ in range(3):           # the third replica has not registered yet: still 3, not 4, not back to 2
        decisions, state = decide(config, missing, state, 0.0)
        assert (decisions[0].current, decisions[0].desired) == (2, 3)
    decisions, state = decide(config, {"decode": PoolSignals(replicas=3, slo_attainment=0.5)}, state, 1.0)
    assert decisions[0].desired == 4                                          # up, and still missing


def test_autoscale_per_pool_headroom_and_square_root_safety():
    config = AutoscaleConfig(prefill=PoolBounds(1, 100), decode=PoolBounds(1, 100), headroom=1.4,
                             decode_headroom=1.1, prefill_headroom=1.0, prefill_safety=2.0, scale_up_after_s=0)
    signals = {"prefill": PoolSignals(replicas=1, demand_rps=16.0, capacity_rps=1.0),    # 16 + 2 * 4 = 24
               "decode": PoolSignals(replicas=1, demand_rps=10.0, capacity_rps=1.0)}     # 10 * 1.1 = 11
    decisions = run(signals, [0.0], config)[0]
    assert (decisions["prefill"].target, decisions["decode"].target) == (24, 11)
    assert (config.pool_headroom("prefill"), config.pool_headroom("decode")) == (1.0, 1.1)
    shared = AutoscaleConfig(headroom=1.3, safety=1.0)        # unset per-pool values fall back to the shared ones
    assert [shared.provision(pool, 9.0) for pool in ("prefill", "decode")] == [15, 15]   # ceil(11.7 + 3)


@pytest.mark.parametrize("kwargs", [{"prefill_headroom": 0.9}, {"decode_headroom": 0.5}, {"safety": -1},
                                    {"decode_safety": -0.1}, {"trend_window_s": -1}, {"trend_horizon_s": -5}])
def test_autoscale_config_refuses_bad_per_pool_and_trend_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AutoscaleConfig(**kwargs)


def test_autoscale_feedback_waits_for_starting_replicas_instead_of_winding_up():
    """An SLO miss while replicas still start keeps the pool (no scale-down), but asks for no more: one
    more per interval until they serve would overshoot by a start-up's worth of intervals."""
    config = AutoscaleConfig(decode=PoolBounds(1, 50), scale_up_after_s=0, scale_down_after_s=0)
    starting = PoolSignals(replicas=6, demand_rps=1.0, capacity_rps=1.0, slo_attainment=0.5, starting=2)
    d = run({"decode": starting}, [0.0, 5.0, 10.0], config)[-1]["decode"]
    assert (d.target, d.desired, d.reason) == (6, 6, "slo")
    serving = PoolSignals(replicas=6, demand_rps=1.0, capacity_rps=1.0, slo_attainment=0.5)
    assert run({"decode": serving}, [0.0], config)[0]["decode"].desired == 7


def test_autoscale_trend_projects_a_rising_need_ahead_and_never_a_falling_one():
    config = AutoscaleConfig(prefill=PoolBounds(1, 100), headroom=1.0, trend_window_s=30, trend_horizon_s=60,
                             scale_up_after_s=0, scale_down_after_s=1000)
    state, targets = AutoscaleState(), []
    for k, t in enumerate(range(0, 35, 5)):                # the need climbs 1 instance per 5 s: 0.2/s
        decisions, state = decide(config, {"prefill": PoolSignals(10, demand_rps=10.0 + k, capacity_rps=1.0)},
                                  state, float(t))
        targets.append(decisions[0].target)
    assert targets[:3] == [10, 11, 12]                     # history shorter than half the window: no trend
    assert targets[-1] == 16 + 12                          # 16 now + 0.2/s x 60 s
    assert all(now - t < 30 for t, _ in state.history["prefill"] for now in [30.0])
    falling = AutoscaleState()
    for k, t in enumerate(range(0, 35, 5)):
        decisions, falling = decide(config, {"prefill": PoolSignals(30, demand_rps=30.0 - k, capacity_rps=1.0)},
                                    falling, float(t))
    assert decisions[0].target == 24                       # the need as it is
    off = run({"prefill": PoolSignals(10, demand_rps=16.0, capacity_rps=1.0)}, [0.0, 5.0, 10.0, 15.0, 20.0],
              AutoscaleConfig(prefill=PoolBounds(1, 100), headroom=1.0))
    assert off[-1]["prefill"].target == 16                 # no trend window: no projection, no history


def test_scheduler_settings_pass_per_pool_headroom_and_zero_means_the_shared_one():
    from services.scheduler.main import SchedulerSettings
    config = SchedulerSettings(autoscale_headroom=1.3, autoscale_decode_headroom=1.1).autoscale_config()
    assert (config.pool_headroom("prefill"), config.pool_headroom("decode")) == (1.3, 1.1)
    with pytest.raises(ValueError, match="prefill_headroom"):
        SchedulerSettings(autoscale_prefill_headroom=0.5)


def test_pool_loads_of_one_model_leave_other_models_pools_out():
    snapshot = ClusterSnapshot(now=0.0, instances=(
        instance("d0", Role.DECODE, num_running=8, num_free_blocks=200),
        instance("d-llm", Role.DECODE, model="other", num_running=1, num_free_blocks=1000),
        instance("p-llm", Role.PREFILL, model="other", num_waiting=3, num_free_blocks=1000)))
    assert pool_loads(snapshot)["decode"].replicas == 2
    mine = pool_loads(snapshot, model="m")
    assert (mine["decode"].replicas, mine["decode"].running, mine["prefill"].replicas) == (1, 8, 0)
    assert pool_loads(snapshot, model="other")["prefill"].waiting == 3.0
