"""Benchmark results → summary, with vLLM ``bench serve`` definitions (pure code).

* TTFT: first streamed token − send.
* TPOT: (E2E − TTFT) / (output tokens − 1) per request; requests with one output token are left out
  (for goodput their TPOT counts as 0, as in vLLM).
* ITL: every gap between consecutive streamed chunks, pooled over all requests.
* E2E latency: end of the stream − send.

Latencies are reported in milliseconds: mean, median, std, P90, P99.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KINDS = ("ttft", "tpot", "e2el")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request's outcome; times in seconds, ``start`` relative to the run's start."""

    index: int
    success: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0  # as the server reported (usage), else the requested input length
    input_len: int = 0  # requested
    output_len: int = 0  # requested
    http_status: int | None = None

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def row(self) -> dict:
        """A JSON-friendly row (times in ms)."""
        d = asdict(self)
        d["start_ms"] = d.pop("start") * 1000
        d["ttft_ms"] = d.pop("ttft") * 1000 if self.success else None
        d["e2el_ms"] = d.pop("latency") * 1000 if self.success else None
        d["itl_ms"] = [x * 1000 for x in d.pop("itl")]
        tpot = self.tpot
        d["tpot_ms"] = tpot * 1000 if tpot is not None else None
        return d


def parse_slo(items: list[str] | str | None) -> dict[str, float]:
    """``"ttft:200,tpot:50"`` (or a list of such items) → ``{"ttft": 200.0, "tpot": 50.0}`` in ms."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [items]
    slo: dict[str, float] = {}
    for part in (p.strip() for item in items for p in item.split(",")):
        if not part:
            continue
        kind, sep, value = part.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in SLO_KINDS:
            raise ValueError(f"bad SLO {part!r}: use KIND:MS with KIND one of {', '.join(SLO_KINDS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {part!r}: {value!r} is not a number of milliseconds") from None
        if ms < 0:
            raise ValueError(f"bad SLO {part!r}: milliseconds must be >= 0")
        slo[kind] = ms
    return slo


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at once (an interval ending exactly when another starts does not overlap)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda ev: (ev[0], ev[1]))
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def stats_ms(values, name: str) -> dict[str, float]:
    """mean/median/std/p90/p99 of ``values`` (seconds; a list or an array) in ms; 0 when empty (as vLLM)."""
    arr = np.asarray(values, dtype=float) * 1000 if len(values) else np.zeros(1)
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for p in PERCENTILES:
        if p != 50:
            out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[k] * 1000 <= ms for k, ms in slo.items())


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float] | None = None) -> dict:
    """The run's summary: counts, throughputs, latency stats (ms), peak concurrency, goodput."""
    slo = slo or {}
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_sec = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    summary: dict = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_sec(len(ok)),
        "output_throughput": per_sec(total_out),
        "total_token_throughput": per_sec(total_in + total_out),
        "peak_concurrency": peak_concurrency([(r.start, r.start + r.latency) for r in results]),
    }
    summary.update(stats_ms([r.ttft for r in ok], "ttft"))
    summary.update(stats_ms([t for r in ok if (t := r.tpot) is not None], "tpot"))
    summary.update(stats_ms([g for r in ok for g in r.itl], "itl"))
    summary.update(stats_ms([r.latency for r in ok], "e2el"))
    good = sum(1 for r in ok if meets_slo(r, slo)) if slo else None
    summary["slo_ms"] = dict(slo)
    summary["good_requests"] = good
    summary["request_goodput"] = per_sec(good) if slo else None
    summary["slo_attainment_pct"] = (100.0 * good / len(results) if results else 0.0) if slo else None
    summary["errors"] = errors
    return summary


def format_table(summary: dict) -> str:
    """The results table, laid out like vLLM's."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def line(label: str, value) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40} {text:<10}")

    line("Successful requests:", summary["completed"])
    line("Failed requests:", summary["failed"])
    line("Benchmark duration (s):", summary["duration_s"])
    line("Total input tokens:", summary["total_input_tokens"])
    line("Total generated tokens:", summary["total_output_tokens"])
    line("Request throughput (req/s):", summary["request_throughput"])
    if summary.get("request_goodput") is not None:
        line("Request goodput (req/s):", summary["request_goodput"])
        line("Requests within SLO (%):", summary["slo_attainment_pct"])
    line("Output token throughput (tok/s):", summary["output_throughput"])
    line("Total token throughput (tok/s):", summary["total_token_throughput"])
    line("Peak concurrent requests:", summary["peak_concurrency"])
    sections = (("ttft", "TTFT", "Time to First Token"),
                ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                ("itl", "ITL", "Inter-token Latency"),
                ("e2el", "E2EL", "End-to-end Latency"))
    for key, short, title in sections:
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        line(f"Mean {short} (ms):", summary[f"mean_{key}_ms"])
        line(f"Median {short} (ms):", summary[f"median_{key}_ms"])
        line(f"P99 {short} (ms):", summary[f"p99_{key}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)
