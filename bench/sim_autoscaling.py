"""GPU-hours of an autoscaled cluster against static provisioning at equal SLO attainment (issue 7;
docs/benchmarks/autoscaling.md). Needs ../shared/data/traces/azure_llm_2023_conv.csv.

    .venv/bin/python bench/sim_autoscaling.py --json docs/benchmarks/autoscaling/autoscaling_cpu.json \\
        --plot docs/benchmarks/autoscaling/replicas.png

The workload is the Azure conversation trace (one hour) at 100x its rate with its shape kept: 100
copies shifted by at most `--multiplier-spread` seconds, so the rate still climbs from ~240 to ~820
req/s and falls back. The first and last minute, which the copies' wrap-around only half fills, are
cut (`--window`). The cluster is `services/sim/configs/llama3-8b-h100-autoscale.yaml`.

(a) Autoscaled: the live policy (policies.autoscale) every `interval_s`, starting at the size it
    would choose for the first window's demand.
(b) Static: for each pool the smallest fixed replica count whose SLO attainment is at least the
    autoscaled run's (TTFT for prefill, TPOT for decode), searched down from the autoscaled run's peak
    with the other pool at its peak; then both at once, raised one replica at a time until every
    attainment (TTFT, TPOT and both) is at least the autoscaled run's. That is static peak
    provisioning at equal SLO attainment. Attainment is assumed monotone in the replica count.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scaled_trace import add_trace_arguments, scaled_trace
from services.engine.sim_profile import SimProfile
from services.scheduler.policies.autoscale import PoolSignals, pool_target
from services.scheduler.policies.capacity import EngineShape, Workload, decode_goodput, prefill_goodput
from services.sim.cli import load_config
from services.sim.results import summarize
from services.sim.simulator import simulate
from services.sim.spec import ClusterSpec, spec_from_mapping
from services.sim.traces import Trace

KEYS = ("gpu_hours_total", "gpu_hours", "ttft_attainment_pct", "tpot_attainment_pct", "slo_attainment_pct",
        "request_goodput", "p99_ttft_ms", "p99_tpot_ms", "median_ttft_ms", "median_tpot_ms", "completed",
        "failed", "peak_replicas", "autoscale", "autoscale_decisions", "simulated_s")
ATTAINMENTS = ("ttft_attainment_pct", "tpot_attainment_pct", "slo_attainment_pct")

TRACE: Trace | None = None          # set before the worker processes fork


def opening_size(spec: ClusterSpec, trace: Trace) -> dict[str, int]:
    """Per pool, what the policy asks for the first window's demand: where a cluster that had been
    autoscaling before the trace began would stand."""
    window = spec.autoscale.window_s
    n = int(np.searchsorted(trace.arrival_s, window))
    workload = Workload(float(trace.num_prompt_tokens[:n].mean()), float(np.maximum(1, trace.num_output_tokens[:n]).mean()))
    profile = SimProfile.load(spec.profile)
    engine = EngineShape(spec.engine.num_blocks, spec.engine.block_size, spec.engine.max_num_seqs)
    capacity = {"prefill": prefill_goodput(profile, workload, spec.slo_ttft_s),
                "decode": decode_goodput(profile, workload, engine, spec.slo_tpot_s)}
    return {pool: pool_target(spec.autoscale.policy, pool, PoolSignals(0, n / window, capacity[pool]))[0]
            for pool in capacity}


def run(config: str, sets: list[str]) -> dict:
    """One simulation: its summary (the table's keys), the replicas series and the wall time."""
    started = time.perf_counter()
    out = simulate(spec_from_mapping(load_config(config, sets), where=config), TRACE)
    summary = summarize(out)
    result = {k: summary.get(k) for k in KEYS} | {"wall_s": time.perf_counter() - started, "set": sets}
    result["series"] = {k: out.series[k][::10].tolist() for k in ("t", "replicas_prefill", "replicas_decode")}
    print(f"  {' '.join(s for s in sets if 'replicas' in s or 'enabled' in s):58} "
          f"GPU-h {result['gpu_hours_total']:7.2f}  TTFT {result['ttft_attainment_pct']:6.2f}%  "
          f"TPOT {result['tpot_attainment_pct']:6.2f}%  both {result['slo_attainment_pct']:6.2f}%  "
          f"{result['wall_s']:5.0f} s wall", flush=True)
    return result


def static_sets(prefill: int, decode: int, extra: list[str]) -> list[str]:
    return [*extra, "autoscale.enabled=false", f"pools.prefill.replicas={prefill}", f"pools.decode.replicas={decode}"]


def meets(result: dict, goal: dict, keys=ATTAINMENTS) -> bool:
    return all(result[k] >= goal[k] for k in keys)


def smallest(config: str, extra: list[str], pool: str, other: int, start: int, goal: dict, key: str) -> int:
    """The smallest static count of `pool` (the other pool fixed at `other`) whose `key` attainment
    reaches the goal: from `start` (up first if it misses) step down 1, 2, 4, ... until one misses, then
    bisect. Stepping down keeps the failing runs close to the boundary: a badly overloaded pool queues
    hundreds of thousands of requests and takes many times longer to simulate."""
    def ok(n: int) -> bool:
        sizes = (n, other) if pool == "prefill" else (other, n)
        return meets(run(config, static_sets(*sizes, extra)), goal, (key,))
    hi = start
    while not ok(hi):
        hi += 1
    step = 1
    while True:                            # hi reaches the goal; find a count below it that misses
        lo = hi - step
        if lo <= 0:
            lo = 0                         # no instance misses everything: no need to run it
            break
        if not ok(lo):
            break
        hi, step = lo, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def static_search(config: str, extra: list[str], auto: dict, jobs: int) -> tuple[dict, list[dict]]:
    peak = auto["peak_replicas"]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        prefill = pool.submit(smallest, config, extra, "prefill", peak["decode"], peak["prefill"], auto,
                              "ttft_attainment_pct")
        decode = pool.submit(smallest, config, extra, "decode", peak["prefill"], peak["decode"], auto,
                             "tpot_attainment_pct")
        sizes = [prefill.result(), decode.result()]
    tried = []
    while True:
        result = run(config, static_sets(*sizes, extra))
        tried.append(result)
        if meets(result, auto):
            return result, tried
        short = [auto[k] - result[k] for k in ("ttft_attainment_pct", "tpot_attainment_pct")]
        sizes[int(np.argmax(short))] += 1


ROWS = (("GPU-hours", "gpu_hours_total", "{:.2f}"), ("TTFT attainment (%)", "ttft_attainment_pct", "{:.2f}"),
        ("TPOT attainment (%)", "tpot_attainment_pct", "{:.2f}"), ("Both SLOs (%)", "slo_attainment_pct", "{:.2f}"),
        ("Goodput (req/s)", "request_goodput", "{:.1f}"), ("P99 TTFT (ms)", "p99_ttft_ms", "{:.0f}"),
        ("P99 TPOT (ms)", "p99_tpot_ms", "{:.1f}"), ("Failed requests", "failed", "{:,}"))


def table(auto: dict, static: dict) -> str:
    lines = [f"| {'':24} | {'autoscaled':>12} | {'static':>12} |", f"|{'-' * 26}|{'-' * 13}:|{'-' * 13}:|"]
    for label, key, fmt in ROWS:
        lines.append(f"| {label:24} | {fmt.format(auto[key]):>12} | {fmt.format(static[key]):>12} |")
    peak = lambda r: f"{r['peak_replicas']['prefill']}P + {r['peak_replicas']['decode']}D"
    lines.append(f"| {'Peak replicas':24} | {peak(auto):>12} | {peak(static):>12} |")
    lines.append(f"| {'Autoscaler decisions':24} | {auto['autoscale_decisions']:>12,} | {'-':>12} |")
    return "\n".join(lines)


def plot(auto: dict, static: dict, trace: Trace, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = auto["series"]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for pool, color in (("prefill", "tab:orange"), ("decode", "tab:blue")):
        ax.step(s["t"], s[f"replicas_{pool}"], where="post", color=color, label=f"{pool}, autoscaled")
        ax.axhline(static["peak_replicas"][pool], color=color, linestyle="--", label=f"{pool}, static")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("instances (paid for, starting and draining included)")
    rate = ax.twinx()
    minutes = np.bincount((trace.arrival_s // 60).astype(int)) / 60
    rate.plot(np.arange(len(minutes)) * 60 + 30, minutes, color="grey", alpha=0.7, label="request rate")
    rate.set_ylabel("requests/s (per-minute mean)")
    rate.set_ylim(0, None)
    ax.set_ylim(0, None)
    handles = ax.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    saved = 100 * (1 - auto["gpu_hours_total"] / static["gpu_hours_total"])
    fig.suptitle(f"Autoscaled vs static at equal SLO attainment: {auto['gpu_hours_total']:.1f} vs "
                 f"{static['gpu_hours_total']:.1f} GPU-hours ({saved:.0f}% fewer)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    global TRACE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="llama3-8b-h100-autoscale")
    add_trace_arguments(p, rate_multiplier=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value")
    p.add_argument("--jobs", type=int, default=2, help="processes for the static search (one per pool)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    started = time.perf_counter()
    TRACE = scaled_trace(args, seed=args.seed)
    if TRACE is None:
        return 2
    spec = spec_from_mapping(load_config(args.config, args.set), where=args.config)
    opening = opening_size(spec, TRACE)
    print(f"{len(TRACE):,} requests over {TRACE.duration_s:,.0f} s ({TRACE.rate_per_s:.0f} req/s mean); "
          f"autoscaled run opens at {opening['prefill']}P + {opening['decode']}D")
    auto = run(args.config, [*args.set, f"pools.prefill.replicas={opening['prefill']}",
                             f"pools.decode.replicas={opening['decode']}"])
    print("static search:")
    static, tried = static_search(args.config, args.set, auto, args.jobs)
    saved = 100 * (1 - auto["gpu_hours_total"] / static["gpu_hours_total"])
    print(table(auto, static))
    wall = time.perf_counter() - started
    rss = {"main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "largest_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    print(f"GPU-hours saved: {saved:.1f}% (goal >= 30%); {wall:.0f} s wall; peak RSS {rss['main_mb']:.0f} MB "
          f"(main), {rss['largest_worker_mb']:.0f} MB (largest worker)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "trace": str(args.trace), "config": args.config, "set": args.set, "rate_multiplier": args.rate_multiplier,
            "multiplier_spread_s": args.multiplier_spread, "window": args.window, "seed": args.seed,
            "requests": len(TRACE), "opening_size": opening, "gpu_hours_saved_pct": saved,
            "autoscaled": auto, "static": static,
            "static_final_checks": [{k: r[k] for k in ("set", *ATTAINMENTS, "gpu_hours_total")} for r in tried],
            "wall_s": wall, "peak_rss": rss}, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(auto, static, TRACE, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
