"""A simulation's outcome → the summary users compare: `ferry bench`'s (vLLM `bench serve`) metric names
and definitions, plus what only a simulator can count over a whole cluster.

    ttft   first token − arrival                    tpot  (E2E − TTFT) / (output tokens − 1)
    e2el   completion − arrival                     goodput  requests/s meeting every SLO (DistServe)
    gpu_hours, energy_kwh, energy_per_token_j, cost_usd   per pool and in total
    migrations {reason: {outcome: n}}, preemptions (KV, recomputed), spot {notices, instances_killed,
    requests_rerouted, evacuation_<action> decisions}, power {budget, overshoot, controller rounds}, autoscale {decisions, instances added / drained / reclaimed / removed},
    peak_replicas per pool, prefix hit rates (trace blocks)

ITL is not reported: the simulator advances a request's tokens in steps it does not record one by
one; its per-request mean is TPOT.
"""
from __future__ import annotations

import numpy as np

from services.benchmark.metrics import stats_ms
from services.sim.simulator import DONE, FAILED, Outcome


def summarize(out: Outcome) -> dict:
    spec, trace = out.spec, out.trace
    ok = out.status == DONE
    arrival = trace.arrival_s
    ttft = (out.t_first - arrival)[ok]
    e2el = (out.t_done - arrival)[ok]
    output = np.maximum(1, trace.num_output_tokens)[ok]
    multi = output > 1
    tpot = (e2el[multi] - ttft[multi]) / (output[multi] - 1)
    duration = float(np.nanmax(out.t_done)) if ok.any() else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    tpot_all = np.zeros(len(e2el))
    tpot_all[multi] = tpot
    ttft_met, tpot_met = ttft <= spec.slo_ttft_s, tpot_all <= spec.slo_tpot_s
    good = int(np.count_nonzero(ttft_met & tpot_met))
    share = (lambda met: 100.0 * int(np.count_nonzero(met)) / len(trace)) if len(trace) else (lambda met: 0.0)
    total_in, total_out = int(trace.num_prompt_tokens[ok].sum()), int(output.sum())
    energy_j = sum(out.energy_j.values())
    summary: dict = {
        "num_requests": len(trace),
        "completed": int(ok.sum()),
        "failed": int(np.count_nonzero(out.status == FAILED)),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(int(ok.sum())),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
    }
    summary.update(stats_ms(ttft, "ttft"))
    summary.update(stats_ms(tpot, "tpot"))
    summary.update(stats_ms(e2el, "e2el"))
    summary.update({
        "slo_ms": {"ttft": spec.slo_ttft_s * 1e3, "tpot": spec.slo_tpot_s * 1e3},
        "good_requests": good,
        "request_goodput": per_s(good),
        "slo_attainment_pct": 100.0 * good / len(trace) if len(trace) else 0.0,
        "ttft_attainment_pct": share(ttft_met),      # of all requests: a failed one misses both
        "tpot_attainment_pct": share(tpot_met),
        "errors": dict(out.failures),
        "gpu_hours": {k: v / 3600 for k, v in out.gpu_seconds.items()},
        "gpu_hours_total": sum(out.gpu_seconds.values()) / 3600,
        "energy_kwh": energy_j / 3.6e6,
        "energy_per_token_j": energy_j / total_out if total_out else None,
        "cost_usd": sum(out.cost_usd.values()),
        "cost_usd_by_pool": out.cost_usd,
        "migrations": _nested(out.migrations),
        "migrated_requests": int(np.count_nonzero(out.num_migrations)),
        "preemptions": int(out.num_preemptions.sum()),
        "spot": {k: out.spot.get(k, 0) for k in ("notices", "instances_killed", "requests_rerouted")}
        | {k: v for k, v in out.spot.items() if k.startswith("evacuation_")},    # decisions, summed over rounds
        "power": out.power,
        "autoscale": {k: out.autoscale.get(k, 0) for k in ("decisions", "instances_added", "instances_drained",
                                                           "instances_reclaimed", "instances_removed")},
        "autoscale_decisions": out.autoscale.get("decisions", 0) if spec.autoscale.enabled else None,
        "peak_replicas": {p.name: int(out.series[f"replicas_{p.name}"].max(initial=0)) for p in spec.pools},
        "prefix_blocks": dict(out.prefix_blocks),
        "prefix_hit_rate": _rate(out.prefix_blocks, "local_hit"),
        "prefix_hit_rate_with_kvstore": _rate(out.prefix_blocks, "local_hit", "kvstore_hit"),
        "simulated_s": out.end_s,
    })
    return summary


ROWS = (("Successful requests", "completed", "{:,}"), ("Failed requests", "failed", "{:,}"),
        ("Duration (s)", "duration_s", "{:,.1f}"), ("Request throughput (req/s)", "request_throughput", "{:,.2f}"),
        ("Request goodput (req/s)", "request_goodput", "{:,.2f}"), ("Within SLO (%)", "slo_attainment_pct", "{:.2f}"),
        ("Output throughput (tok/s)", "output_throughput", "{:,.0f}"), ("Median TTFT (ms)", "median_ttft_ms", "{:.1f}"),
        ("P99 TTFT (ms)", "p99_ttft_ms", "{:.1f}"), ("Median TPOT (ms)", "median_tpot_ms", "{:.2f}"),
        ("P99 TPOT (ms)", "p99_tpot_ms", "{:.2f}"), ("Median E2E (ms)", "median_e2el_ms", "{:.0f}"),
        ("P99 E2E (ms)", "p99_e2el_ms", "{:.0f}"), ("GPU-hours", "gpu_hours_total", "{:,.2f}"),
        ("Energy (kWh)", "energy_kwh", "{:,.2f}"), ("Energy per output token (J)", "energy_per_token_j", "{:.2f}"),
        ("Cost (USD)", "cost_usd", "{:,.2f}"), ("Migrated requests", "migrated_requests", "{:,}"),
        ("Preemptions", "preemptions", "{:,}"), ("Autoscaler decisions", "autoscale_decisions", "{:,}"), ("Prefix hit rate (local)", "prefix_hit_rate", "{:.3f}"),
        ("Prefix hit rate (+ kvstore)", "prefix_hit_rate_with_kvstore", "{:.3f}"))


def format_summary(summary: dict) -> str:
    """The summary as a table (`ferry bench`'s layout, plus the cluster-wide figures)."""
    lines = ["{:=^52}".format(" Simulation Result ")]
    for label, key, fmt in ROWS:
        value = summary.get(key)
        lines.append(f"{label:<38} {fmt.format(value) if value is not None else '-'}")
    lines.append("=" * 52)
    return "\n".join(lines)


def latencies(out: Outcome) -> dict[str, np.ndarray]:
    """Per completed request, in seconds: ttft, tpot (output > 1 only), e2el — for CDF plots."""
    ok = out.status == DONE
    arrival = out.trace.arrival_s
    ttft = (out.t_first - arrival)[ok]
    e2el = (out.t_done - arrival)[ok]
    output = np.maximum(1, out.trace.num_output_tokens)[ok]
    multi = output > 1
    return {"ttft": ttft, "tpot": (e2el[multi] - ttft[multi]) / (output[multi] - 1), "e2el": e2el}


def _nested(counts) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (reason, outcome), n in sorted(counts.items()):
        out.setdefault(reason, {})[outcome] = n
    return out


def _rate(blocks: dict[str, int], *hits: str) -> float | None:
    return sum(blocks[h] for h in hits) / blocks["prompt"] if blocks["prompt"] else None
