"""Autoscaling in the simulator (services/sim/autoscaler.py): a load step scales the decode pool out and
its SLO attainment recovers, which a fixed pool's does not; a load drop scales it in by draining, with
every request finished (with and without live migration); runs repeat exactly; the `autoscale:`
section's errors name the key."""
from __future__ import annotations

import numpy as np
import pytest

from services.sim.cli import load_config
from services.sim.results import summarize
from services.sim.simulator import DONE, simulate
from services.sim.spec import spec_from_mapping
from services.sim.traces import PrefixHashes, Trace

PROFILE = "llama3-8b-h100"
TPOT_SLO_S = 0.05


def spec(autoscale: dict | None = None, **overrides):
    """Prefill pinned at 2 instances, decode autoscaled from 1 between 1 and 12; 8 sequences per
    decode instance make decode the pool that runs out. Quarter-second ticks keep the tests fast."""
    data = {"profile": PROFILE, "pools": {"prefill": {"replicas": 2}, "decode": {"replicas": 1}},
            "engine": {"num_blocks": 4000, "max_num_seqs": 8}, "slo": {"ttft_s": 1.0, "tpot_s": TPOT_SLO_S},
            "scheduler": {"heartbeat_interval_s": 0.25},
            "autoscale": {"enabled": True, "interval_s": 5, "window_s": 20, "startup_s": 10,
                          "prefill": {"min_replicas": 2, "max_replicas": 2},
                          "decode": {"min_replicas": 1, "max_replicas": 12},
                          "scale_up_after_s": 0, "scale_down_after_s": 20, "max_step_down": 2,
                          **(autoscale or {})}}
    data.update(overrides)
    return spec_from_mapping(data)


def steps(*phases: tuple[float, float], seed: int = 0, output: tuple[int, int] = (50, 150)) -> Trace:
    """Poisson arrivals at `rate` req/s for `seconds`, phase after phase; short prompts, outputs in
    [output)."""
    rng = np.random.default_rng(seed)
    arrivals, start = [], 0.0
    for rate, seconds in phases:
        arrivals.append(np.sort(rng.uniform(start, start + seconds, rng.poisson(rate * seconds))))
        start += seconds
    arrival = np.concatenate(arrivals)
    n = len(arrival)
    return Trace(arrival, rng.integers(100, 400, n), rng.integers(*output, n), PrefixHashes.empty(n), 512)


def tpot_attainment(out, start: float, end: float) -> float:
    """The share of requests finishing in [start, end) within the TPOT SLO."""
    out_tokens = np.maximum(1, out.trace.num_output_tokens)
    done = (out.t_done >= start) & (out.t_done < end) & (out_tokens > 1)
    tpot = (out.t_done[done] - out.t_first[done]) / (out_tokens[done] - 1)
    return float(np.mean(tpot <= TPOT_SLO_S))


def replicas_at(out, pool: str, t: float) -> int:
    return int(out.series[f"replicas_{pool}"][np.searchsorted(out.series["t"], t)])


def test_a_load_step_scales_the_decode_pool_out_and_attainment_recovers() -> None:
    trace = steps((3, 60), (30, 150))
    scaled = simulate(spec(), trace)
    fixed = simulate(spec({"enabled": False}), trace)
    assert replicas_at(scaled, "decode", 50) == 1
    assert replicas_at(scaled, "decode", 200) >= 4
    assert replicas_at(scaled, "prefill", 200) == 2                  # bounds pin it
    assert tpot_attainment(scaled, 60, 90) < 0.9                     # the step hurts before new instances serve
    assert tpot_attainment(scaled, 150, 210) >= 0.97                 # ... and not once they do
    assert tpot_attainment(fixed, 150, 210) < 0.5
    summary = summarize(scaled)
    assert summary["autoscale"]["instances_added"] >= 3 and summary["autoscale_decisions"] >= 1
    assert summary["peak_replicas"]["decode"] == int(scaled.series["replicas_decode"].max())


@pytest.mark.parametrize("migration_interval_s", [0.0, 0.5])
def test_load_falls_and_the_pool_scales_in_through_drains_losing_nothing(migration_interval_s) -> None:
    trace = steps((30, 120), (10, 150), output=(200, 500))     # still busy after the fall: drains have work
    out = simulate(spec(migration_interval_s=migration_interval_s), trace)
    summary = summarize(out)
    assert (out.status == DONE).all()                                # every request finishes
    assert summary["autoscale"]["instances_drained"] >= 3
    assert summary["autoscale"]["instances_removed"] == (summary["autoscale"]["instances_drained"]
                                                         - summary["autoscale"]["instances_reclaimed"])
    assert replicas_at(out, "decode", 100) >= 2 * replicas_at(out, "decode", 260)
    drained_by_migration = summary["migrations"].get("drain", {}).get("completed", 0)
    assert (drained_by_migration > 0) == (migration_interval_s > 0)
    # a removed instance stops costing: fewer GPU-seconds than keeping the peak all along
    assert out.gpu_seconds["decode"] < 0.9 * summary["peak_replicas"]["decode"] * out.end_s


def test_same_seed_same_results_with_autoscaling() -> None:
    def run():
        out = simulate(spec(), steps((3, 40), (30, 80), (3, 60), seed=7))
        return out, summarize(out)

    (a, sa), (b, sb) = run(), run()
    np.testing.assert_array_equal(a.t_done, b.t_done)
    np.testing.assert_array_equal(a.series["replicas_decode"], b.series["replicas_decode"])
    assert sa["autoscale"] == sb["autoscale"] and sa["autoscale"]["decisions"] > 0
    assert sa["gpu_hours_total"] == sb["gpu_hours_total"]


@pytest.mark.parametrize(("autoscale", "message"), [
    ({"enabld": True}, "unknown keys ['enabld']"),
    ({"decode": {"max": 3}}, "autoscale.decode: unknown keys ['max']"),
    ({"headroom": 0.5}, "headroom 0.5"),
    ({"decode_headroom": 0.5}, "decode_headroom 0.5"),
    ({"prefill_safety": "lots"}, "autoscale.prefill_safety"),
    ({"enabled": "yes"}, "autoscale.enabled"),
    ({"interval_s": 0}, "interval_s"),
    ({"decode": {"min_replicas": 4, "max_replicas": 2}}, "replica bounds"),
])
def test_autoscale_spec_errors_name_the_key(autoscale, message) -> None:
    with pytest.raises(ValueError, match="autoscale") as error:
        spec_from_mapping({"profile": PROFILE, "pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}},
                           "autoscale": autoscale})
    assert message in str(error.value)


def test_autoscaling_colocated_pools_is_an_error_and_set_reaches_the_section() -> None:
    with pytest.raises(ValueError, match="only prefill and decode pools"):
        spec_from_mapping({"profile": PROFILE, "pools": {"colocated": {"replicas": 2}},
                           "autoscale": {"enabled": True}})
    data = load_config("llama3-8b-h100-disagg", ["autoscale.enabled=true", "autoscale.decode.max_replicas=40",
                                                 "autoscale.headroom=1.5"])
    s = spec_from_mapping(data)
    assert s.autoscale.enabled and s.autoscale.policy.decode.max_replicas == 40
    assert s.autoscale.policy.headroom == 1.5 and s.autoscale.policy.prefill.max_replicas == 16
    per_pool = spec_from_mapping(load_config("llama3-8b-h100-disagg", [
        "autoscale.enabled=true", "autoscale.decode_headroom=1.1", "autoscale.prefill_safety=1",
        "autoscale.trend_window_s=30"])).autoscale.policy
    assert (per_pool.pool_headroom("decode"), per_pool.pool_headroom("prefill")) == (1.1, per_pool.headroom)
    assert (per_pool.pool_safety("prefill"), per_pool.pool_safety("decode"), per_pool.trend_window_s) == (1.0, 0.0, 30.0)


def test_the_policy_is_told_which_replicas_still_start() -> None:
    """Instances added during the run count in `replicas` from the decision and in `starting` until they
    serve, so the policy's feedback waits for them rather than adding one per interval."""
    from services.sim.autoscaler import Autoscaler
    from services.sim.simulator import Simulator
    sim = Simulator(spec(), steps((10.0, 30.0)))
    sim.add_instances(sim.spec.pools[1], 3, serving_at=40.0)
    signals = Autoscaler(sim).signals(1, now=20.0)
    assert (signals.replicas, signals.starting) == (4, 3)
    assert Autoscaler(sim).signals(1, now=45.0).starting == 0


def test_a_short_multiplier_spread_keeps_the_rate_curve_an_autoscaler_follows() -> None:
    """Copies shifted by at most a minute keep a ramp a ramp; shifted over the whole trace they flatten it."""
    ramp = steps((2, 300), (10, 300))
    kept = ramp.with_rate_multiplier(20, seed=0, spread_s=60)
    flat = ramp.with_rate_multiplier(20, seed=0)
    late = lambda t: np.mean(t.arrival_s >= 300)
    assert late(ramp) > 0.8 and late(kept) > 0.7 and late(flat) < 0.6
    with pytest.raises(ValueError, match="spread_s"):
        ramp.with_rate_multiplier(2, seed=0, spread_s=10_000)
