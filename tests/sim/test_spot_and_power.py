"""Spot availability traces (determinism, rates, bursts, grace periods, replacements), the preemption
planner against reroute-on-kill on a small cluster, and the power controller keeping a budget."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.sim.results import summarize
from services.sim.simulator import DONE, simulate
from services.sim.spec import spec_from_mapping
from services.sim.spot_trace import NOTICE_S, SpotMarket, availability, describe, generate
from services.sim.traces import PrefixHashes, Trace

SIZES = {"decode": 12}
HOUR = 3600.0


def market(**changes) -> SpotMarket:
    return dataclasses.replace(SpotMarket(pools="decode"), **changes)


def test_the_same_seed_gives_the_same_events_and_another_seed_others() -> None:
    assert generate(market(seed=7), SIZES, HOUR) == generate(market(seed=7), SIZES, HOUR)
    assert generate(market(seed=7), SIZES, HOUR) != generate(market(seed=8), SIZES, HOUR)


@pytest.mark.parametrize("provider", ["gcp", "aws", "azure"])
def test_every_notice_has_the_providers_grace_period(provider) -> None:
    events = generate(market(provider=provider, calm_rate_per_hour=2.0), SIZES, HOUR)
    notices = [e for e in events if e.preempt]
    assert notices and {e.notice_s for e in notices} == {NOTICE_S[provider]}


def test_calm_zones_preempt_at_the_configured_rate() -> None:
    # never turbulent: independent preemptions at 0.5 per instance-hour; over 40 seeds the mean is close
    calm = {"calm_rate_per_hour": 0.5, "turbulent_mean_s": 1e-9, "calm_mean_s": 1e12}
    rates = [describe(generate(market(seed=s, **calm), SIZES, HOUR), SIZES, market(**calm), HOUR)
             ["preemptions_per_instance_hour"] for s in range(40)]
    assert np.mean(rates) == pytest.approx(0.5, rel=0.2)


def test_turbulent_zones_reclaim_in_bursts_within_one_zone() -> None:
    stormy = market(calm_rate_per_hour=0.0, calm_mean_s=1e-9, turbulent_mean_s=1e12, burst_rate_per_hour=6,
                    burst_fraction=0.5, burst_spread_s=10, num_zones=3)
    events = generate(stormy, SIZES, HOUR)
    stats = describe(events, SIZES, stormy, HOUR)
    assert stats["largest_burst"] >= 2 and stats["mean_burst"] > 1.5
    # instances are spread over zones round-robin: a first burst takes ids of one zone only
    first = min(e.at_s for e in events if e.preempt)
    burst = [int(e.preempt.split("-")[1]) for e in events if e.preempt and e.at_s - first < stormy.burst_spread_s]
    assert len({k % 3 for k in burst if k < SIZES["decode"]}) == 1


def test_every_preempted_instance_is_replaced_after_acquisition_and_start_up() -> None:
    m = market(calm_rate_per_hour=1.0, acquire_mean_s=20, startup_s=60)
    events = generate(m, SIZES, 5 * HOUR)
    notices, adds = [e for e in events if e.preempt], [e for e in events if e.add]
    assert len(notices) - len(adds) in range(4)        # the last few replacements fall after the end
    assert all(e.startup_s == 60 and e.add == "decode" for e in adds)
    # a replacement never comes before its request; ids go on where the initial instances stop
    assert all(a.at_s >= n.at_s for n, a in zip(sorted(notices, key=lambda e: e.at_s), adds, strict=False))
    serving = availability(events, SIZES, m, 5 * HOUR)
    assert serving.min() >= SIZES["decode"] - 6 and serving.max() <= SIZES["decode"]
    assert any(e.preempt == "decode-0012" for e in notices) or len(adds) < 5   # replacements get preempted too


def trace(n: int, gap: float, prompt: int, output: int) -> Trace:
    return Trace(np.arange(n) * gap, np.full(n, prompt), np.full(n, output), PrefixHashes.empty(n), 512)


def small_spot_spec(mode: str, **extra):
    return spec_from_mapping({
        "profile": "llama3-8b-h100", "pools": {"prefill": {"replicas": 2}, "decode": {"replicas": 4}},
        "engine": {"num_blocks": 6000, "max_num_seqs": 64}, "tick_s": 0.05,
        "scheduler": {"migration_interval_s": 0.5, "preemption": mode},
        "spot": [{"at_s": 10, "preempt": "decode-0000", "notice_s": 5},
                 {"at_s": 11, "preempt": "decode-0001", "notice_s": 5},
                 {"at_s": 12, "add": "decode", "replicas": 2, "startup_s": 10}], **extra})


def test_the_planner_loses_no_request_and_beats_reroute_on_kill() -> None:
    t = trace(240, 0.1, 600, 1200)
    results = {mode: summarize(simulate(small_spot_spec(mode), t)) for mode in ("restart", "reroute", "planner")}
    for summary in results.values():
        assert summary["completed"] == 240 and summary["failed"] == 0
    planner, reroute, restart = results["planner"], results["reroute"], results["restart"]
    assert planner["spot"]["requests_rerouted"] == 0 and reroute["spot"]["requests_rerouted"] > 0
    assert planner["migrations"]["preemption"]["completed"] > 0 and planner["spot"]["evacuation_finish"] > 0
    for key in ("p99_ttft_ms", "p99_tpot_ms", "p99_e2el_ms"):
        assert planner[key] < reroute[key] and planner[key] < restart[key]
    # restarting from scratch generates the lost tokens again: far behind the planner
    assert restart["p99_e2el_ms"] > 1.5 * planner["p99_e2el_ms"]


def test_a_spot_market_in_the_spec_generates_its_events() -> None:
    spec = small_spot_spec("planner", spot_market={"pools": "decode", "calm_rate_per_hour": 40, "seed": 1})
    out = simulate(spec, trace(200, 0.1, 500, 300))
    assert out.spot["notices"] > 2 and (out.status == DONE).all()


def power_spec(control: bool, budget: float):
    return spec_from_mapping({
        "profile": "llama3-8b-h100", "pools": {"prefill": {"replicas": 3, "gpu": "h100"},
                                               "decode": {"replicas": 3, "gpu": "h100"}},
        "gpus": {"h100": {"idle_watts": 90, "peak_watts": 700}},
        "engine": {"num_blocks": 6000, "max_num_seqs": 128}, "tick_s": 0.05,
        "power_budget_watts": budget, "power": {"control": control, "interval_s": 2.0}})


def test_the_power_controller_keeps_the_budget_within_one_control_period() -> None:
    t = trace(1500, 0.02, 1500, 300)          # every instance busy: 6 x 700 W against a 3,500 W budget
    uncapped = simulate(power_spec(False, 3500), t)
    capped = simulate(power_spec(True, 3500), t)
    assert uncapped.power["overshoot_s"] > 10                  # the load does need capping
    assert capped.power["longest_overshoot_periods"] <= 1.0
    assert capped.power["levels"].get("emergency", 0) + capped.power["levels"].get("threshold1", 0) > 0
    assert (capped.status != 0).all()                          # every request ends done or failed (no route)
    assert set(capped.failures) <= {"no route: has_kv_room"}   # slower decode fills KV: refused, not lost
    assert sum(capped.energy_j.values()) < sum(uncapped.energy_j.values())
    assert capped.series["capped"].max() > 0


def test_a_capped_clock_slows_steps_as_the_profile_says() -> None:
    t = trace(1, 1.0, 1000, 200)
    free = simulate(power_spec(False, 7000), t)
    # a budget so low that the first round caps every GPU at the lowest clocks
    slow = simulate(power_spec(True, 800), t)
    assert slow.t_first[0] - 1.0 > 1.5 * (free.t_first[0] - 1.0)   # prefill is compute-bound: ~1/f
    assert slow.power["longest_overshoot_periods"] <= 1.0
