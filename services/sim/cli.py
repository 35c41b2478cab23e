"""`ferry sim`: simulate a cluster spec over a trace; print the results table, write JSON and plots.

    ferry sim --trace ../shared/data/traces/azure_llm_2023_conv.csv --config llama3-8b-h100-disagg
    ferry sim --trace conv.csv --config scale-1000 --rate-multiplier 200 --out bench/out/sim-scale
    ferry sim --trace synthetic:rate=20,duration=600 --config C --set scheduler.routing=round_robin

--set KEY=VALUE overrides one spec value (dotted for sections: slo.ttft_s=1, pools.decode.replicas=8).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import yaml

from services.common.named_yaml import find_yaml
from services.sim.results import format_summary, summarize
from services.sim.simulator import simulate
from services.sim.spec import CONFIGS, spec_from_mapping
from services.sim.trace_formats import load_trace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry sim", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--trace", required=True, help="Azure .csv, Mooncake .jsonl, or synthetic:rate=..,duration=..")
    p.add_argument("--config", required=True,
                   help=f"cluster spec YAML, or one of: {', '.join(sorted(c.stem for c in CONFIGS.glob('*.yaml')))}")
    p.add_argument("--rate-multiplier", type=int, default=1,
                   help="overlay k shifted copies of the trace: k x the rate over the same hour")
    p.add_argument("--multiplier-spread", type=float, default=None, metavar="SECONDS",
                   help="shift the multiplier's copies by at most this much (default: the whole trace, which "
                        "flattens its rate over time; a minute keeps its shape)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="compress time: arrivals x 1/scale")
    p.add_argument("--window", default="", metavar="START:END", help="only arrivals in [START, END) seconds")
    p.add_argument("--seed", type=int, default=0, help="seeds the rate multiplier's offsets")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value")
    p.add_argument("--out", type=Path, help="write summary.json and the plots here")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_config(config: str, overrides: list[str]) -> dict:
    data = yaml.safe_load(find_yaml(config, CONFIGS, "cluster spec").read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: use KEY=VALUE")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = yaml.safe_load(value)
    return data


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_mapping(load_config(args.config, args.set), where=args.config)
        trace = load_trace(args.trace)
        if args.rate_multiplier > 1:
            trace = trace.with_rate_multiplier(args.rate_multiplier, seed=args.seed, spread_s=args.multiplier_spread)
        if args.rate_scale != 1.0:
            trace = trace.scaled(args.rate_scale)
        if args.window:
            start, _, end = args.window.partition(":")
            trace = trace.window(float(start or 0), float(end) if end else float("inf"))
    except (ValueError, FileNotFoundError) as e:
        print(f"ferry sim: {e}", file=sys.stderr)
        return 2
    if not len(trace):
        print("ferry sim: the trace has no requests (check --window)", file=sys.stderr)
        return 2
    print(f"ferry sim: {len(trace):,} requests over {trace.duration_s:,.0f} s, "
          f"{sum(p.replicas for p in spec.pools):,} instances, routing {spec.routing}", flush=True)
    started = time.perf_counter()
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=round(trace.duration_s), unit="sim s", mininterval=0.5, file=sys.stderr)
    last = [0]

    def progress(now: float) -> None:
        step = min(int(now), bar.total) - last[0]
        if step > 0:
            bar.update(step)
            last[0] += step

    outcome = simulate(spec, trace, progress=progress if bar is not None else None)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - started
    summary = summarize(outcome)
    summary["peak_concurrency"] = int(max(outcome.series["running"], default=0))
    summary["wall_s"] = wall
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(format_summary(summary))
    print(f"simulated {outcome.end_s:,.0f} s in {wall:.1f} s wall, peak RSS {summary['peak_rss_mb']:.0f} MB")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(
            {"trace": args.trace, "config": args.config, "set": args.set, "rate_multiplier": args.rate_multiplier,
             "multiplier_spread": args.multiplier_spread,
             "window": args.window, "summary": summary}, indent=2, default=float) + "\n")
        if not args.no_plots:
            from services.sim.plots import write_plots
            for path in write_plots(outcome, args.out, title=Path(args.config).stem):
                print(f"wrote {path}")
        print(f"wrote {args.out / 'summary.json'}")
    return 0
