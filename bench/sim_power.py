"""POLCA on the simulator: 30% more instances than the power budget allows at peak, kept under the budget
by the live power controller (issue 8; docs/benchmarks/spot-power.md). Needs
../shared/data/traces/azure_llm_2023_conv.csv.

    .venv/bin/python bench/sim_power.py --json docs/benchmarks/spot-power/power_cpu.json

The workload is the Azure conversation trace (one hour) at 20x its rate with its shape kept (copies
shifted by at most 60 s; the first and last minute cut). The cluster is llama3-8b-h100-disagg's engine
with `--prefill` + `--decode` instances; the budget is what `instances / 1.3` GPUs draw at peak power
(budget = floor(instances / oversubscription) x peak watts).

    capped      power.control on: policies.power.decide every `--interval-s`, caps lock SM clocks; decode
                (low priority) at its TPOT SLO clock past threshold 1, prefill at `--prefill-clock-mhz` past
                threshold 2, everything to the fitting clock past the budget
    uncapped    the same cluster, no controller (its overshoot of the same budget is measured)
    fitting     only the instances the budget allows at peak, uncapped: what the budget buys without
                oversubscription

Overshoot: the cluster's mean power over each second above the budget; an episode is a run of such
seconds, reported in control periods (goal: at most one).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scaled_trace import add_trace_arguments, scaled_trace
from services.sim.cli import load_config
from services.sim.results import summarize
from services.sim.simulator import simulate
from services.sim.spec import spec_from_mapping
from services.sim.traces import Trace

KEYS = ("slo_attainment_pct", "ttft_attainment_pct", "tpot_attainment_pct", "p99_ttft_ms", "p99_tpot_ms",
        "median_ttft_ms", "median_tpot_ms", "energy_kwh", "energy_per_token_j", "completed", "failed",
        "gpu_hours_total", "power")
TRACE: Trace | None = None          # set before the worker processes fork


def run(config: str, sets: list[str], label: str) -> dict:
    started = time.perf_counter()
    out = simulate(spec_from_mapping(load_config(config, sets), where=config), TRACE)
    summary = summarize(out)
    watts = out.series["power_watts"]
    result = {k: summary.get(k) for k in KEYS} | {"run": label, "set": sets}
    result["power_watts"] = {"mean": float(watts.mean()), "max": float(watts.max()),
                             "p99": float(sorted(watts)[int(0.99 * (len(watts) - 1))])}
    result["series"] = {"t": out.series["t"][::5].tolist(), "power_watts": watts[::5].tolist(),
                        "capped": out.series["capped"][::5].tolist()}
    result["wall_s"] = time.perf_counter() - started
    power = result["power"]
    print(f"  {label:9} SLO {result['slo_attainment_pct']:6.2f}%  {result['energy_per_token_j']:.3f} J/token  "
          f"power mean {result['power_watts']['mean']:6.0f} W max {result['power_watts']['max']:6.0f} W  "
          f"over budget {power['overshoot_s']:.0f} s, longest {power['longest_overshoot_periods']:.1f} periods  "
          f"{result['wall_s']:.0f} s wall", flush=True)
    return result


ROWS = (("Instances", "instances", "{}"), ("Power budget (W)", "budget", "{:,.0f}"),
        ("SLO attainment, both (%)", "slo_attainment_pct", "{:.2f}"),
        ("TTFT / TPOT attainment (%)", "attainments", "{}"), ("P99 TTFT (ms)", "p99_ttft_ms", "{:.0f}"),
        ("P99 TPOT (ms)", "p99_tpot_ms", "{:.1f}"), ("Energy per output token (J)", "energy_per_token_j", "{:.3f}"),
        ("Energy (kWh)", "energy_kwh", "{:.2f}"), ("Mean / max power, 1 s means (W)", "watts", "{}"),
        ("Seconds over budget", "over_s", "{:.0f}"), ("Overshoot episodes", "episodes", "{}"),
        ("Longest overshoot (control periods)", "longest", "{:.2f}"), ("Controller rounds by level", "levels", "{}"))


def table(results: list[dict]) -> str:
    cells = []
    for r in results:
        p = r["power"]
        cells.append(r | {"instances": r["instances"], "budget": p["budget_watts"],
                          "attainments": f"{r['ttft_attainment_pct']:.2f} / {r['tpot_attainment_pct']:.2f}",
                          "watts": f"{r['power_watts']['mean']:,.0f} / {r['power_watts']['max']:,.0f}",
                          "over_s": p["overshoot_s"], "episodes": p["overshoot_episodes"],
                          "longest": p["longest_overshoot_periods"],
                          "levels": ", ".join(f"{k} {v}" for k, v in sorted(p["levels"].items())) or "-"})
    lines = ["| | " + " | ".join(r["run"] for r in results) + " |", "|---|" + "---:|" * len(results)]
    for label, key, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(c[key]) for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    global TRACE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="llama3-8b-h100-disagg")
    add_trace_arguments(p, rate_multiplier=20)
    p.add_argument("--prefill", type=int, default=9)
    p.add_argument("--decode", type=int, default=4)
    p.add_argument("--oversubscription", type=float, default=1.3, help="instances / instances the budget fits")
    p.add_argument("--interval-s", type=float, default=5.0, help="the controller's period")
    p.add_argument("--prefill-max-utilization", type=float, default=0.7,
                   help="power.prefill_max_utilization: a prefill GPU (no TPOT step model) is capped no lower than "
                        "the clock that keeps it this busy (prefill is compute-bound: busy ~ 1/f)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    started = time.perf_counter()
    TRACE = scaled_trace(args)
    if TRACE is None:
        return 2
    spec = spec_from_mapping(load_config(args.config, args.set), where=args.config)
    peak = spec.gpus[spec.pools[0].gpu].peak_watts
    instances = args.prefill + args.decode
    fitting = math.floor(instances / args.oversubscription)
    budget = fitting * peak
    # the budget-fitting cluster keeps the pools' proportions (at least one of each)
    fit_decode = max(1, round(fitting * args.decode / instances))
    base = [f"power_budget_watts={budget}", f"power.interval_s={args.interval_s}",
            f"power.prefill_max_utilization={args.prefill_max_utilization}", *args.set]
    sizes = lambda p_, d_: [f"pools.prefill.replicas={p_}", f"pools.decode.replicas={d_}"]
    runs = [(base + sizes(args.prefill, args.decode) + ["power.control=true"], "capped"),
            (base + sizes(args.prefill, args.decode) + ["power.control=false"], "uncapped"),
            (base + sizes(fitting - fit_decode, fit_decode) + ["power.control=false"], "fitting")]
    print(f"{len(TRACE):,} requests over {TRACE.duration_s:,.0f} s; {instances} instances "
          f"({args.prefill}P + {args.decode}D), budget {budget:,.0f} W = {fitting} x {peak:.0f} W")
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(run, [args.config] * len(runs), *zip(*runs, strict=True)))
    for r, n in zip(results, (instances, instances, fitting), strict=True):
        r["instances"] = n
    print(table(results))
    capped, uncapped = results[0], results[1]
    saved = 100 * (1 - capped["energy_per_token_j"] / uncapped["energy_per_token_j"])
    print(f"capped: longest overshoot {capped['power']['longest_overshoot_periods']:.2f} control periods (goal <= 1), "
          f"SLO {capped['slo_attainment_pct']:.2f}% (goal >= 99), energy/token {saved:.1f}% below uncapped; "
          f"{time.perf_counter() - started:.0f} s wall")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "trace": str(args.trace), "config": args.config, "set": args.set, "rate_multiplier": args.rate_multiplier,
            "multiplier_spread_s": args.multiplier_spread, "window": args.window, "requests": len(TRACE),
            "oversubscription": args.oversubscription, "budget_watts": budget, "interval_s": args.interval_s,
            "energy_per_token_saved_pct": saved, "runs": results, "wall_s": time.perf_counter() - started},
            indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
