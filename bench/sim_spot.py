"""Spot preemption handling on the simulator: the just-in-time evacuation planner against reroute-on-kill,
and the cost of spot instances against on-demand ones (issue 8; docs/benchmarks/spot-power.md). Needs
../shared/data/traces/azure_llm_2023_conv.csv.

    .venv/bin/python bench/sim_spot.py --json docs/benchmarks/spot-power/spot_gcp_cpu.json

The workload is the Azure conversation trace (one hour) at 20x its rate with its shape kept (copies
shifted by at most 60 s; the first and last minute cut). The cluster is
`services/sim/configs/llama3-8b-h100-spot.yaml`: every instance a spot VM at 0.4x the on-demand price,
preempted by the spot market model (services/sim/spot_trace.py), one market per seed.

    on-demand   the same pools on on-demand GPUs, nothing preempted: the cost and latency reference
    restart     the notice goes unheeded; at the deadline the instance dies and what it held starts again
                from scratch elsewhere (SpotServe's rerouting baseline: the partial output is discarded)
    reroute     the same, but recomputed from its tokens so far (the gateway keeps the streamed tokens)
    planner     the notice stops routing to the instance; every migration round (1 s) plan_evacuation
                finishes each request in place or migrates it by min-cost matching before the deadline

P99s are over every request of the trace, and over the requests exposed to a preemption: those that
arrived between 30 s before a notice and 60 s after its deadline (the same requests in both modes).
`queue_after_kills` is the queue of prompt work and of KV not yet in a decode batch (requests) in the
30 s after each deadline, against its median over the run: whether the re-route burst after a kill
queues the prefill pool.

Other regimes (docs/benchmarks/spot-power.md): `--provider aws` (120 s notice); `--trace` a Mooncake
.jsonl (long contexts; `--distinct-prefixes` gives the rate multiplier's copies their own prefix ids) or
`synthetic:rate=...,output_mean=...` (long outputs; use `--rate-multiplier 1`).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scaled_trace import add_trace_arguments, scaled_trace
from services.sim.cli import load_config
from services.sim.results import latencies, summarize
from services.sim.simulator import simulate
from services.sim.spec import spec_from_mapping
from services.sim.spot_trace import describe, generate
from services.sim.traces import Trace

KEYS = ("p99_ttft_ms", "p99_tpot_ms", "p99_e2el_ms", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms",
        "slo_attainment_pct", "completed", "failed", "errors", "gpu_hours_total", "cost_usd", "spot", "migrations")
EXPOSED_BEFORE_S, EXPOSED_AFTER_S = 30.0, 60.0
MODES = ("restart", "reroute", "planner")
TRACE: Trace | None = None          # set before the worker processes fork


def mode_sets(mode: str, seed: int, provider: str) -> list[str]:
    if mode == "on-demand":
        return ["spot_market.pools=''", "pools.prefill.gpu=h100", "pools.decode.gpu=h100"]
    return [f"scheduler.preemption={mode}", f"spot_market.seed={seed}", f"spot_market.provider={provider}"]


def run(config: str, extra: list[str], mode: str, seed: int, provider: str) -> dict:
    started = time.perf_counter()
    spec = spec_from_mapping(load_config(config, [*extra, *mode_sets(mode, seed, provider)]), where=config)
    out = simulate(spec, TRACE)
    summary = summarize(out)
    result = {k: summary.get(k) for k in KEYS} | {"mode": mode, "seed": seed, "provider": provider}
    sizes = {p.name: p.replicas for p in spec.pools}
    duration = float(TRACE.arrival_s[-1])
    events = generate(spec.spot_market, sizes, duration) if spec.spot_market.pool_names else ()
    result["market"] = describe(events, sizes, spec.spot_market, duration) if events else {}
    result["queue_after_kills"] = queue_after_kills(out, events)
    exposed = exposed_requests(events, TRACE.arrival_s)
    result["exposed_requests"] = int(exposed.sum())
    result["exposed"] = exposed_p99(out, exposed)
    result["wall_s"] = time.perf_counter() - started
    print(f"  {mode:9} seed {seed} {provider}: P99 TTFT {result['p99_ttft_ms']:8.0f} ms  TPOT "
          f"{result['p99_tpot_ms']:6.1f} ms  E2E {result['p99_e2el_ms']:7.0f} ms  SLO {result['slo_attainment_pct']:6.2f}%"
          f"  ${result['cost_usd']:.2f}  rerouted {summary['spot']['requests_rerouted']}  "
          f"migrations {summary['migrations']}  {result['wall_s']:.0f} s wall", flush=True)
    return result


def queue_after_kills(out, events, after_s: float = 30.0) -> dict:
    """The queue of prompt work and of KV not yet in a decode batch (requests, sampled each second) in
    the `after_s` seconds after each preemption deadline: its peak and mean there, and its median."""
    t, queued = out.series["t"], out.series["queued"]
    if not len(t):
        return {}
    near = np.zeros(len(t), bool)
    for e in events:
        if e.preempt:
            deadline = e.at_s + e.notice_s
            near |= (t >= deadline) & (t < deadline + after_s)
    return {"median": float(np.median(queued)), "max_after": float(queued[near].max()) if near.any() else math.nan,
            "mean_after": float(queued[near].mean()) if near.any() else math.nan}


def exposed_requests(events, arrival_s: np.ndarray) -> np.ndarray:
    """Requests that arrived from EXPOSED_BEFORE_S before a notice to EXPOSED_AFTER_S after its deadline."""
    mask = np.zeros(len(arrival_s), bool)
    for e in events:
        if e.preempt:
            mask |= (arrival_s >= e.at_s - EXPOSED_BEFORE_S) & (arrival_s < e.at_s + e.notice_s + EXPOSED_AFTER_S)
    return mask


def exposed_p99(out, exposed: np.ndarray) -> dict:
    """P99 TTFT / TPOT / E2E (ms) over the completed exposed requests."""
    ok = out.status == 1
    keep = exposed[ok]
    lat = latencies(out)
    output = np.maximum(1, out.trace.num_output_tokens)[ok]
    p99 = lambda x: float(np.percentile(x, 99) * 1e3) if len(x) else math.nan
    return {"p99_ttft_ms": p99(lat["ttft"][keep]), "p99_tpot_ms": p99(lat["tpot"][keep[output > 1]]),
            "p99_e2el_ms": p99(lat["e2el"][keep]), "failed": int((exposed & (out.status != 1)).sum())}


def ratios(results: list[dict], baseline: str, where: str) -> dict[str, float]:
    """baseline / planner of the P99s, over the seeds' runs pooled by their mean."""
    def mean(mode: str, key: str) -> float:
        values = [(r if where == "all" else r["exposed"])[key] for r in results if r["mode"] == mode]
        return float(np.mean(values))
    return {k: mean(baseline, k) / mean("planner", k) for k in ("p99_ttft_ms", "p99_tpot_ms", "p99_e2el_ms")}


def table(results: list[dict]) -> str:
    head = f"| {'run':22} | {'P99 TTFT ms':>11} | {'P99 TPOT ms':>11} | {'P99 E2E ms':>10} | " \
           f"{'exposed P99 TTFT/TPOT/E2E ms':>28} | {'SLO %':>6} | {'rerouted':>8} | {'GPU-h':>5} | {'cost $':>6} |"
    lines = [head, "|" + "|".join("-" * (len(c) + 2) for c in head.split("|")[1:-1]) + "|"]
    for r in results:
        x = r["exposed"]
        exposed = f"{x['p99_ttft_ms']:.0f} / {x['p99_tpot_ms']:.1f} / {x['p99_e2el_ms']:.0f}" \
            if r["mode"] != "on-demand" else "-"
        lines.append(f"| {r['mode'] + ' seed ' + str(r['seed']) if r['mode'] != 'on-demand' else 'on-demand':22} | "
                     f"{r['p99_ttft_ms']:11.0f} | {r['p99_tpot_ms']:11.1f} | {r['p99_e2el_ms']:10.0f} | {exposed:>28} | "
                     f"{r['slo_attainment_pct']:6.2f} | {r['spot']['requests_rerouted']:8,} | "
                     f"{r['gpu_hours_total']:5.2f} | {r['cost_usd']:6.2f} |")
    return "\n".join(lines)


def main() -> int:
    global TRACE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="llama3-8b-h100-spot")
    add_trace_arguments(p, rate_multiplier=20)
    p.add_argument("--distinct-prefixes", action="store_true",
                   help="the rate multiplier's copies get their own prefix ids (default: shared, as in the Azure runs)")
    p.add_argument("--seeds", default="0,1,2", help="spot market seeds, comma separated")
    p.add_argument("--modes", default=",".join(MODES),
                   help="spot modes to run besides on-demand, comma separated (empty: on-demand only, to size a load)")
    p.add_argument("--provider", default="gcp", choices=("gcp", "azure", "aws"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    started = time.perf_counter()
    TRACE = scaled_trace(args, share_prefixes=not args.distinct_prefixes)
    if TRACE is None:
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{len(TRACE):,} requests over {TRACE.duration_s:,.0f} s; {args.provider} notices; seeds {seeds}")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        p.error(f"--modes: use some of {', '.join(MODES)}")
    runs = [("on-demand", 0)] + [(mode, seed) for seed in seeds for mode in modes]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(run, *zip(*[(args.config, args.set, m, s, args.provider) for m, s in runs],
                                          strict=True)))
    print(table(results))
    spot = [r for r in results if r["mode"] != "on-demand"]
    if {"restart", "reroute", "planner"} - set(modes):
        return 0
    summary = {f"{base}_over_planner": {where: ratios(spot, base, where) for where in ("all", "exposed")}
               for base in ("restart", "reroute")}
    summary["cost_vs_on_demand"] = float(np.mean([r["cost_usd"] for r in spot if r["mode"] == "planner"])
                                         / results[0]["cost_usd"])
    for base in ("restart", "reroute"):
        for where in ("all", "exposed"):
            print(f"{base} / planner P99 (mean over seeds), {where:7} requests: "
                  + ", ".join(f"{k[4:-3]} {v:.2f}x" for k, v in summary[f"{base}_over_planner"][where].items()))
    print(f"planner cost / on-demand cost: {summary['cost_vs_on_demand']:.2f} "
          f"({100 * (1 - summary['cost_vs_on_demand']):.0f}% cheaper); {time.perf_counter() - started:.0f} s wall")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "trace": args.trace, "config": args.config, "set": args.set, "rate_multiplier": args.rate_multiplier,
            "distinct_prefixes": args.distinct_prefixes, "trace_stats": TRACE.describe(),
            "multiplier_spread_s": args.multiplier_spread, "window": args.window, "provider": args.provider,
            "seeds": seeds, "requests": len(TRACE), "summary": summary, "runs": results,
            "wall_s": time.perf_counter() - started}, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
