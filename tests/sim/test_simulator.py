"""The cluster simulator: its closed forms against plain loops and the profile's own numbers, every
request accounted for, determinism, and the mechanisms (routing presets, KV preemption, migration,
spot notices, prefix caches) doing what they claim."""
from __future__ import annotations

import json

import numpy as np
import pytest

from services.engine.sim_profile import SimProfile
from services.sim.cli import main as sim_main
from services.sim.fifo import serve_fifo
from services.sim.results import summarize
from services.sim.simulator import DONE, FAILED, simulate
from services.sim.spec import load_spec, spec_from_mapping
from services.sim.trace_formats import load_trace
from services.sim.traces import PrefixHashes, Trace

PROFILE = "llama3-8b-h100"


def spec(**overrides):
    data = {"profile": PROFILE, "pools": {"prefill": {"replicas": 2}, "decode": {"replicas": 3}},
            "engine": {"num_blocks": 4000, "max_num_seqs": 64}, "tick_s": 0.02}
    data.update(overrides)
    return spec_from_mapping(data)


def trace(arrival, prompt, output, hashes=None, block_size=512) -> Trace:
    n = len(arrival)
    return Trace(np.asarray(arrival, float), np.asarray(prompt), np.asarray(output),
                 PrefixHashes.from_lists(hashes) if hashes else PrefixHashes.empty(n), block_size)


def test_fifo_closed_form_equals_the_lindley_loop() -> None:
    rng = np.random.default_rng(0)
    queue = np.sort(rng.integers(0, 6, 200))
    avail = 10 + rng.random(200) * 2
    service = rng.random(200) * 0.1
    start, finish = serve_fifo(queue, avail, service, t0=10.5)
    for q in range(6):
        free = 10.5
        for k in np.flatnonzero(queue == q):
            begin = max(free, avail[k])
            free = begin + service[k]
            assert start[k] == pytest.approx(begin) and finish[k] == pytest.approx(free)


def test_one_request_on_an_idle_cluster_takes_exactly_the_profiles_times() -> None:
    s = spec(network={"kv_bandwidth_bytes_per_s": 1e10, "kv_latency_s": 0.003})
    out = simulate(s, trace([1.0], [1000], [101]))
    p = SimProfile.load(PROFILE)
    prefill = p.seconds(1000, 1000 * 1001 / 2, 1000)
    transfer = 0.003 + 1001 * p.kv_bytes_per_token / 1e10
    ctx = 1001 + np.arange(100)                      # each decode step reads the context so far
    decode = float(sum(p.seconds(1, c, c) for c in ctx))
    assert out.status[0] == DONE
    assert out.t_first[0] - 1.0 == pytest.approx(prefill, rel=1e-6)
    # the batch's context is tracked as it grows, so only rounding inside a step differs
    assert out.t_done[0] - out.t_first[0] == pytest.approx(transfer + decode, rel=2e-3)


def test_every_request_ends_done_or_failed_with_consistent_times() -> None:
    t = load_trace("synthetic:rate=40,n=1500,seed=3,prompt_mean=1500,output_mean=300")
    out = simulate(spec(), t)                     # more than 3 decode instances' KV holds: some 503s
    assert set(np.unique(out.status)) == {DONE, FAILED}
    ok = out.status == DONE
    assert ok.sum() >= 0.9 * len(t)
    assert set(out.failures) == {"no route: has_kv_room", "no route: fits_context"}
    assert (out.t_first[ok] >= t.arrival_s[ok]).all() and (out.t_done[ok] >= out.t_first[ok]).all()
    s = summarize(out)
    assert s["completed"] + s["failed"] == len(t)
    assert s["gpu_hours_total"] == pytest.approx(5 * out.end_s / 3600, rel=1e-6)


def test_same_seed_same_results_and_another_seed_differs() -> None:
    def run(seed: int):
        t = load_trace(f"synthetic:rate=60,n=1200,seed={seed}")
        s = spec(migration_interval_s=0.5, engine={"num_blocks": 600, "max_num_seqs": 32},
                 spot=[{"at_s": 5, "preempt": "decode-0001", "notice_s": 3}])
        return simulate(s, t)

    a, b, c = run(7), run(7), run(8)
    for name in ("status", "t_first", "t_done", "num_migrations", "num_preemptions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert summarize(a) == summarize(b)
    assert a.migrations == b.migrations and a.series.keys() == b.series.keys()
    assert not np.array_equal(a.t_done, c.t_done)


def test_round_robin_spreads_requests_evenly_and_load_aware_follows_the_load() -> None:
    t = trace(np.arange(30) * 0.001, [100] * 30, [2000] * 30)
    rr = simulate(spec(scheduler={"routing": "round_robin"}), t)
    assert rr.status.tolist() == [DONE] * 30
    s = summarize(rr)
    assert s["completed"] == 30


def test_kv_pressure_preempts_and_recomputes_without_losing_requests() -> None:
    t = trace(np.arange(12) * 0.15, [1200] * 12, [1500] * 12)
    out = simulate(spec(engine={"num_blocks": 700, "max_num_seqs": 64}, pools={"prefill": {"replicas": 1},
                                                                              "decode": {"replicas": 1}}), t)
    preempted = out.num_preemptions > 0
    assert preempted.sum() > 0
    assert (out.status[preempted] == DONE).all() and (out.status == DONE).sum() >= 7
    assert set(out.failures) <= {"no route: has_kv_room"}    # routing refuses what cannot fit (HTTP 503)


def test_a_spot_notice_is_evacuated_just_in_time_by_the_preemption_planner() -> None:
    t = trace(np.arange(24) * 0.05, [800] * 24, [3000] * 24)
    # a long notice: its requests finish in place (3,000 tokens at ~7 ms a step fit in 60 s)
    out = simulate(spec(migration_interval_s=0.5, spot=[{"at_s": 3, "preempt": "decode-0000", "notice_s": 60}]), t)
    assert (out.status == DONE).all()
    assert out.spot["evacuation_finish"] > 0 and out.spot["requests_rerouted"] == 0
    # a short one: they migrate to the survivors before the deadline, none is recomputed
    out = simulate(spec(migration_interval_s=0.5, spot=[{"at_s": 3, "preempt": "decode-0000", "notice_s": 8}]), t)
    assert (out.status == DONE).all()
    assert out.migrations[("preemption", "completed")] > 0 and out.num_migrations.sum() > 0
    assert out.spot["instances_killed"] == 1 and out.spot["requests_rerouted"] == 0


def test_a_spot_kill_without_migration_reroutes_and_loses_nothing() -> None:
    t = trace(np.arange(24) * 0.05, [800] * 24, [3000] * 24)
    s = spec(spot=[{"at_s": 2, "preempt": "decode-0000", "notice_s": 1}, {"at_s": 2, "add": "decode",
                                                                         "startup_s": 5}])
    out = simulate(s, t)
    assert (out.status == DONE).all()
    assert out.series["replicas_decode"].max() == 4 and out.series["replicas_decode"][-1] == 3
    spot = summarize(out)["spot"]
    assert spot["notices"] == 1 and spot["instances_killed"] == 1 and spot["requests_rerouted"] > 0


def test_prefix_aware_routing_hits_more_cache_than_round_robin() -> None:
    rng = np.random.default_rng(1)
    convs = [[1000 * c + b for b in range(12)] for c in range(16)]
    hashes = [convs[int(rng.integers(16))][: int(rng.integers(4, 12))] for _ in range(300)]
    t = trace(np.arange(300) * 0.05, [len(h) * 512 for h in hashes], [20] * 300, hashes)
    pools = {"prefill": {"replicas": 4}, "decode": {"replicas": 2}}
    aware = summarize(simulate(spec(pools=pools), t))
    blind = summarize(simulate(spec(pools=pools, scheduler={"routing": "round_robin"}), t))
    assert aware["prefix_hit_rate"] > blind["prefix_hit_rate"] + 0.1
    assert aware["median_ttft_ms"] < blind["median_ttft_ms"]


def test_colocated_instances_prefill_and_decode_without_transfers() -> None:
    t = trace([0.0], [1000], [50])
    out = simulate(spec(pools={"colocated": {"replicas": 2}}, network={"kv_latency_s": 5.0}), t)
    assert out.status[0] == DONE and out.t_done[0] < 2.0      # a 5 s hand-off never happened


def test_spec_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['replica'\]"):
        spec(pools={"decode": {"replica": 2}})
    with pytest.raises(ValueError, match="gpu 'a100' is not under gpus"):
        spec(pools={"decode": {"replicas": 2, "gpu": "a100"}})
    with pytest.raises(ValueError, match="'profile' is required"):
        spec_from_mapping({"pools": {"decode": {"replicas": 1}}})
    assert load_spec("llama3-8b-h100-disagg").pools[1].replicas == 6


def test_ferry_sim_writes_summary_and_plots(tmp_path, capsys) -> None:
    rc = sim_main(["--trace", "synthetic:rate=20,n=300,seed=1", "--config", "llama3-8b-h100-disagg",
                   "--set", "scheduler.migration_interval_s=0.5", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["completed"] == 300 and summary["wall_s"] > 0 and summary["peak_rss_mb"] > 0
    for name in ("latency_cdf.png", "replicas.png", "power.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "Simulation Result" in capsys.readouterr().out
    assert sim_main(["--trace", "nope.csv", "--config", "llama3-8b-h100-disagg"]) == 2
