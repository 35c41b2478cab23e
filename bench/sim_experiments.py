"""The simulator experiments of docs/benchmarks/simulator.md, each printed as a table, plotted, and saved
as JSON. Needs the traces in ../shared/data/traces/.

    .venv/bin/python bench/sim_experiments.py                  # all three, ~10 min on 2 cores
    .venv/bin/python bench/sim_experiments.py --only c         # one

(a) DistServe: 8 H100s serving Llama-3-8B colocated vs disaggregated (2 to 5 of them prefill), goodput
    under TTFT ≤ 0.5 s and TPOT ≤ 20 ms across request rates (the Azure conversation trace overlaid k times).
(b) Llumnix: round-robin vs load-aware vs load-aware + live migration; LLaMA-2-7B on A10s (4 prefill +
    8 decode, 20k KV tokens each), the conversation trace at 2x: P99 latencies, preemptions.
(c) Mooncake: prefix-aware routing (the ferry preset, TTFT model calibrated for H100s:
    bench/sim/routing-ferry-h100-long.yaml) vs prefix-blind (load_aware, round_robin) on the Mooncake
    conversation trace, 8 prefill + 8 decode H100s (128k context), without and with a kvstore.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from services.sim.cli import load_config
from services.sim.plots import cdf
from services.sim.results import latencies, summarize
from services.sim.simulator import simulate
from services.sim.spec import spec_from_mapping
from services.sim.trace_formats import load_trace

TRACES = ROOT.parent / "shared" / "data" / "traces"
AZURE_CONV, MOONCAKE = TRACES / "azure_llm_2023_conv.csv", TRACES / "mooncake_conversation.jsonl"
# Tight SLOs in DistServe's sense: ~3x an unloaded Llama-3-8B H100 decode step (~7 ms), and half a second to the
# first token (an unloaded 1k-token prefill takes ~30 ms).
SLO_A = {"ttft_s": 0.5, "tpot_s": 0.02}
KEYS = ("completed", "failed", "request_throughput", "request_goodput", "slo_attainment_pct", "median_ttft_ms",
        "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "p99_e2el_ms", "preemptions", "migrated_requests",
        "prefix_hit_rate", "prefix_hit_rate_with_kvstore", "gpu_hours_total", "energy_per_token_j")


def run(spec, trace, label: str) -> tuple[dict, object]:
    started = time.perf_counter()
    out = simulate(spec, trace)
    summary = summarize(out)
    summary["wall_s"] = time.perf_counter() - started
    print(f"  {label:34} {len(trace):>7,} req  {summary['wall_s']:6.1f} s wall  "
          f"goodput {summary['request_goodput']:7.2f}/s  P99 TTFT {summary['p99_ttft_ms']:8.0f} ms  "
          f"P99 TPOT {summary['p99_tpot_ms']:6.1f} ms", flush=True)
    return {k: summary.get(k) for k in KEYS} | {"wall_s": summary["wall_s"], "errors": summary["errors"]}, out


def experiment_a(out_dir: Path, multipliers: list[int], window_s: float) -> dict:
    print("(a) disaggregated vs colocated goodput across rates")
    base = load_trace(str(AZURE_CONV))
    placements = {"colocated 8": {"colocated": {"replicas": 8}}}
    for p in (2, 3, 4, 5):
        placements[f"disaggregated {p}P+{8 - p}D"] = {"prefill": {"replicas": p}, "decode": {"replicas": 8 - p}}
    rows: dict[str, list[dict]] = {name: [] for name in placements}
    for k in multipliers:
        trace = base.with_rate_multiplier(k, seed=0).window(0, window_s)   # one seed: nested overlays
        for name, pools in placements.items():
            spec = spec_from_mapping({**load_config("llama3-8b-h100-disagg", []), "pools": pools, "slo": SLO_A})
            summary, _ = run(spec, trace, f"{name} x{k} ({trace.rate_per_s:.0f} req/s)")
            rows[name].append({"multiplier": k, "rate": trace.rate_per_s, **summary})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, points in rows.items():
        points = sorted(points, key=lambda p: p["rate"])
        rates = [p["rate"] for p in points]
        style = "--" if name.startswith("colocated") else "-"
        left.plot(rates, [p["request_goodput"] for p in points], style, marker="o", label=name)
        right.plot(rates, [p["slo_attainment_pct"] for p in points], style, marker="o", label=name)
    slo = f"TTFT≤{SLO_A['ttft_s']:g} s, TPOT≤{SLO_A['tpot_s'] * 1e3:g} ms"
    left.set(xlabel="request rate (req/s)", ylabel="goodput (req/s within SLO)", title="goodput, 8 H100s")
    right.set(xlabel="request rate (req/s)", ylabel="within SLO (%)", title=f"SLO attainment ({slo})")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, out_dir / "a_disagg_vs_colocated.png")
    return rows


def experiment_b(out_dir: Path, multiplier: int, rate_scale: float, window_s: float) -> dict:
    print("(b) round-robin vs load-aware vs migration")
    trace = load_trace(str(AZURE_CONV)).with_rate_multiplier(multiplier, seed=0).scaled(rate_scale).window(0, window_s)
    base = {"profile": str(ROOT / "bench" / "profiles" / "llama2-7b-a10.yaml"), "model": "llama2-7b",
            "pools": {"prefill": {"replicas": 4, "gpu": "a10"}, "decode": {"replicas": 8, "gpu": "a10"}},
            "engine": {"num_blocks": 1280, "max_num_seqs": 64, "max_num_batched_tokens": 2048},
            "gpus": {"a10": {"price_per_hour": 0.75, "idle_watts": 30, "peak_watts": 150}},
            "network": {"kv_bandwidth_bytes_per_s": 3.0e9, "kv_latency_s": 0.001},
            "slo": {"ttft_s": 1.0, "tpot_s": 0.1}}
    configs = {"round_robin": {"routing": "round_robin", "migration_interval_s": 0},
               "load_aware": {"routing": "load_aware", "migration_interval_s": 0},
               "load_aware + migration": {"routing": "load_aware", "migration_interval_s": 0.5}}
    rows, outs = {}, {}
    for name, scheduler in configs.items():
        rows[name], outs[name] = run(spec_from_mapping({**base, "scheduler": scheduler}), trace, name)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, out in outs.items():
        cdf(left, latencies(out)["tpot"], name)
        cdf(right, latencies(out)["ttft"], name)
    left.set(xscale="log", xlabel="TPOT (ms)", ylabel="fraction of requests", title="TPOT, upper tail",
             ylim=(0.9, 1.001))
    right.set(xscale="log", xlabel="TTFT (ms)", title="TTFT, upper tail", ylim=(0.9, 1.001))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, out_dir / "b_routing_migration.png")
    return rows


def experiment_c(out_dir: Path) -> dict:
    print("(c) prefix-aware vs prefix-blind routing on Mooncake")
    trace = load_trace(str(MOONCAKE))
    base = {"profile": "llama3-8b-h100", "model": "llama3-8b",
            "pools": {"prefill": {"replicas": 8, "gpu": "h100"}, "decode": {"replicas": 8, "gpu": "h100"}},
            "engine": {"num_blocks": 26000, "max_num_seqs": 256, "max_num_batched_tokens": 8192,
                       "max_model_len": 131072},
            "gpus": {"h100": {"price_per_hour": 2.5, "idle_watts": 90, "peak_watts": 700}},
            "network": {"kv_bandwidth_bytes_per_s": 25e9, "kv_latency_s": 0.001},
            "slo": {"ttft_s": 5.0, "tpot_s": 0.05}}
    aware = str(ROOT / "bench" / "sim" / "routing-ferry-h100-long.yaml")
    variants = {"prefix-aware": aware, "prefix-blind (load_aware)": "load_aware",
                "prefix-blind (round_robin)": "round_robin"}
    rows, outs = {}, {}
    for store in (0, 50_000):
        for label, routing in variants.items():
            if store and routing == "round_robin":
                continue
            name = f"{label}{' + kvstore' if store else ''}"
            spec = spec_from_mapping({**base, "kvstore_blocks": store, "scheduler": {"routing": routing}})
            rows[name], outs[name] = run(spec, trace, name)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(rows)
    x = np.arange(len(names))
    left.bar(x - 0.2, [rows[n]["prefix_hit_rate"] for n in names], 0.4, label="prefill instance's own cache")
    left.bar(x + 0.2, [rows[n]["prefix_hit_rate_with_kvstore"] for n in names], 0.4, label="+ kvstore")
    left.set_xticks(x, [n.replace(" (", "\n(").replace(" + ", "\n+ ") for n in names], fontsize=7)
    left.set(ylabel="prompt blocks served from cache", title="prefix hit rate, Mooncake conversation")
    left.legend()
    for name, out in outs.items():
        cdf(right, latencies(out)["ttft"], name)
    right.set(xscale="log", xlabel="TTFT (ms)", ylabel="fraction", title="TTFT CDF")
    right.legend()
    right.grid(alpha=0.3)
    save(fig, out_dir / "c_prefix_routing.png")
    return rows


def save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"  wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="abc", help="which experiments (letters a, b, c)")
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "benchmarks" / "sim")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "sim_experiments.json")
    p.add_argument("--window-s", type=float, default=600.0, help="trace window of (a) and (b)")
    p.add_argument("--multipliers", default="4,8,10,12,14,16,18,20", help="(a): rate multipliers of the conv trace")
    args = p.parse_args(argv)
    for path in (AZURE_CONV, MOONCAKE):
        if not path.is_file():
            print(f"trace {path} not found (it lives in ../shared/data/traces/)", file=sys.stderr)
            return 1
    results = {}
    if "a" in args.only:
        results["a"] = experiment_a(args.plots, [int(k) for k in args.multipliers.split(",")], args.window_s)
    if "b" in args.only:
        results["b"] = experiment_b(args.plots, 2, 0.8, args.window_s)
    if "c" in args.only:
        results["c"] = experiment_c(args.plots)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.json.is_file():     # keep the other experiments' results when running only some
        results = {**json.loads(args.json.read_text()).get("results", {}), **results}
    args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                    indent=2, default=float) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
