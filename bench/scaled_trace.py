"""The scaled production trace the simulator benchmarks share: a trace file (or `synthetic:...`), its
rate multiplied by overlaid copies shifted by at most `--multiplier-spread` seconds (the rate curve's
shape kept), and a `--window` cut (the copies' wrap-around only half fills the first and last minute).

    add_trace_arguments(parser, rate_multiplier=20)   --trace --rate-multiplier --multiplier-spread --window
    scaled_trace(args, seed=0) -> Trace | None        None (after saying why) when the trace file is absent
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from services.sim.trace_formats import load_trace
from services.sim.traces import Trace

ROOT = Path(__file__).resolve().parents[1]
AZURE_CONV = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"


def add_trace_arguments(parser: argparse.ArgumentParser, *, rate_multiplier: int) -> None:
    parser.add_argument("--trace", default=str(AZURE_CONV),
                        help="an Azure .csv, a Mooncake .jsonl or synthetic:key=value,... (services/sim/trace_formats.py)")
    parser.add_argument("--rate-multiplier", type=int, default=rate_multiplier)
    parser.add_argument("--multiplier-spread", type=float, default=60.0,
                        help="the copies are shifted by at most this many seconds (keeps the rate curve's shape)")
    parser.add_argument("--window", default="60:3540", metavar="START:END", help="seconds of the scaled trace kept")


def scaled_trace(args: argparse.Namespace, *, seed: int = 0, share_prefixes: bool = True) -> Trace | None:
    if not args.trace.startswith("synthetic:") and not Path(args.trace).exists():
        print(f"{Path(sys.argv[0]).stem}: the trace {args.trace} is absent (../shared/data/traces)", file=sys.stderr)
        return None
    start, _, end = args.window.partition(":")
    return load_trace(args.trace).with_rate_multiplier(args.rate_multiplier, seed=seed, share_prefixes=share_prefixes,
                                                       spread_s=args.multiplier_spread) \
        .window(float(start or 0), float(end) if end else math.inf)
