"""Simulator validation: the local stack's bench scenario measured, then simulated, P50/P99 TTFT and TPOT
compared (issue 6's goal: within 15%).

    .venv/bin/python bench/sim_validation.py --json bench/out/sim_validation.json
    .venv/bin/python bench/sim_validation.py --measured bench/out/sim_validation.json   # re-simulate only

Measured: `ferry up --engine sim` (bench/llumnix.py's runner; sim-engine workers pace every step in real
time by the performance profile, so the measured latencies are the stack's — gateway, scheduler,
gRPC hand-offs, the engine's step scheduler — around the profile's step times) replays a window of
the Azure conversation trace with `ferry bench`. Simulated: `ferry sim` on the same requests (same
rows, arrival times and lengths) with the same pools, KV blocks, routing preset and profile.

The sim workers' KV is a few placeholder bytes a token, so the spec's network is loopback gRPC:
bandwidth that makes the copy free and a fixed hand-off latency (--handoff-latency-s).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import llumnix
from services.benchmark.workload import load_trace as load_rows
from services.benchmark.workload import scale_length, select_trace_rows
from services.sim.results import summarize
from services.sim.simulator import simulate
from services.sim.spec import spec_from_mapping
from services.sim.traces import PrefixHashes, Trace

METRICS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")
CONFIG = "ferry_no_migration"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--measured", type=Path, help="reuse this earlier JSON's measured run (skip the stack)")
    p.add_argument("--handoff-latency-s", type=float, default=0.002,
                   help="prefill → decode hand-off on loopback (a few gRPC calls)")
    p.add_argument("--tick-s", type=float, default=0.005)
    p.add_argument("--json", type=Path)
    ours, rest = p.parse_known_args(argv)
    defaults = ["--configs", CONFIG, "--prefill", "1", "--decode", "2", "--sim-num-blocks", "2048",
                "--num-prompts", "300", "--trace-time-scale", "2", "--migration-interval-s", "0.5"]
    args = llumnix.parse_args(defaults + rest)
    for k, v in vars(ours).items():
        setattr(args, k, v)
    return args


def trace_of(args: argparse.Namespace) -> Trace:
    """The requests `ferry bench` sent: the same rows, re-based times × scale, capped lengths."""
    rows = select_trace_rows(load_rows(args.trace), args.num_prompts, args.trace_start, args.seed)
    arrival = np.array([r.time * args.trace_time_scale for r in rows])
    prompt = np.array([scale_length(r.input_len, args.length_scale, args.max_input_len) for r in rows])
    output = np.array([scale_length(r.output_len, args.length_scale, args.max_output_len) for r in rows])
    return Trace(arrival, prompt, output, PrefixHashes.empty(len(rows)))


def simulate_scenario(args: argparse.Namespace) -> dict:
    slo = dict(item.split(":") for item in args.slo.split(","))
    spec = spec_from_mapping({
        "profile": args.sim_profile, "model": "SmolLM2-135M-Instruct",
        "pools": {"prefill": {"replicas": args.prefill}, "decode": {"replicas": args.decode}},
        "engine": {"num_blocks": args.sim_num_blocks},
        "network": {"kv_bandwidth_bytes_per_s": 1e15, "kv_latency_s": args.handoff_latency_s},
        "scheduler": {"routing": llumnix.CONFIGS[CONFIG]["routing-config"], "migration_interval_s": 0},
        "slo": {"ttft_s": float(slo["ttft"]) / 1e3, "tpot_s": float(slo["tpot"]) / 1e3},
        "tick_s": args.tick_s,
    })
    return summarize(simulate(spec, trace_of(args)))


def compare(measured: dict, simulated: dict) -> dict[str, dict[str, float]]:
    return {m: {"measured": measured[m], "simulated": simulated[m],
                "error_pct": 100 * (simulated[m] - measured[m]) / measured[m]} for m in METRICS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measured:
        measured = json.loads(args.measured.read_text())["measured"]
    else:
        with tempfile.TemporaryDirectory(prefix="ferry-simval-") as tmp:
            measured = llumnix.run_config(CONFIG, args, Path(tmp))
    simulated = simulate_scenario(args)
    rows = compare(measured["summary"], simulated)
    print(f"\n{'':18}{'measured':>12}{'simulated':>12}{'error':>9}")
    for m, r in rows.items():
        print(f"{m:18}{r['measured']:12.1f}{r['simulated']:12.1f}{r['error_pct']:+8.1f}%")
    worst = max(abs(r["error_pct"]) for r in rows.values())
    print(f"completed: measured {measured['summary']['completed']}, simulated {simulated['completed']}; "
          f"worst error {worst:.1f}% (goal: within 15%)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "measured": measured, "simulated": simulated,
                                         "comparison": rows, "worst_error_pct": worst}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if worst <= 15 else 1


if __name__ == "__main__":
    sys.exit(main())
