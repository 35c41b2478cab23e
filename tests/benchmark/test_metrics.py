"""Metrics math against hand-computed values (vLLM `bench serve` definitions)."""
from __future__ import annotations

import pytest

from services.benchmark.metrics import RequestResult, format_table, parse_slo, peak_concurrency, summarize


def ok(i, start, ttft, latency, out, prompt, itl):
    return RequestResult(index=i, success=True, start=start, ttft=ttft, latency=latency, output_tokens=out,
                         prompt_tokens=prompt, itl=itl)


# r0: TPOT (0.5-0.1)/4 = 100 ms; r1: (1.2-0.2)/8 = 125 ms; r2: one token, no TPOT; r3 failed.
RESULTS = [
    ok(0, 0.0, 0.1, 0.5, 5, 10, [0.1, 0.1, 0.1, 0.1]),
    ok(1, 0.2, 0.2, 1.2, 9, 20, [0.05, 0.15, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3]),
    ok(2, 0.3, 0.3, 0.3, 1, 30, []),
    RequestResult(index=3, success=False, error="HTTP 400: nope", start=0.4, latency=0.05, prompt_tokens=40),
]
DURATION = 2.0


@pytest.fixture
def summary():
    return summarize(RESULTS, DURATION)


@pytest.mark.parametrize("key,expected", [
    ("num_requests", 4), ("completed", 3), ("failed", 1),
    ("total_input_tokens", 60), ("total_output_tokens", 15),
    ("request_throughput", 1.5), ("output_throughput", 7.5), ("total_token_throughput", 37.5),
    ("peak_concurrency", 4),
    # TTFT [100, 200, 300] ms
    ("mean_ttft_ms", 200.0), ("median_ttft_ms", 200.0), ("p90_ttft_ms", 280.0), ("p99_ttft_ms", 298.0),
    ("std_ttft_ms", (20000 / 3) ** 0.5),
    # TPOT [100, 125] ms (the one-token request is excluded)
    ("mean_tpot_ms", 112.5), ("median_tpot_ms", 112.5), ("p99_tpot_ms", 124.75), ("std_tpot_ms", 12.5),
    # ITL pooled: 12 gaps [50, 100 x 9, 150, 300], sum 1.4 s; P99 at rank 10.89 = 150 + 0.89 * 150
    ("mean_itl_ms", 1400 / 12), ("median_itl_ms", 100.0), ("p99_itl_ms", 283.5),
    # E2E [500, 1200, 300] ms
    ("mean_e2el_ms", 2000 / 3), ("median_e2el_ms", 500.0), ("p90_e2el_ms", 1060.0), ("p99_e2el_ms", 1186.0),
    ("request_goodput", None), ("slo_attainment_pct", None),
])
def test_summary_values(summary, key, expected):
    assert summary[key] == pytest.approx(expected)


def test_errors_are_counted(summary):
    assert summary["errors"] == {"HTTP 400: nope": 1}


@pytest.mark.parametrize("slo,good", [
    ({"ttft": 250}, 2),               # r0, r1
    ({"ttft": 100}, 1),               # boundary is inclusive
    ({"tpot": 110}, 2),               # r0 (100) and r2 (one token: TPOT counts as 0)
    ({"e2el": 600}, 2),               # r0, r2
    ({"e2el": 1500}, 3),              # all successes; never the failed one
    ({"ttft": 250, "tpot": 110}, 1),  # every SLO must hold: r0
    ({"ttft": 250, "tpot": 130, "e2el": 1000}, 1),
    ({"ttft": 50}, 0),
])
def test_goodput_per_slo_kind(slo, good):
    s = summarize(RESULTS, DURATION, slo)
    assert s["good_requests"] == good
    assert s["request_goodput"] == pytest.approx(good / DURATION)
    assert s["slo_attainment_pct"] == pytest.approx(100 * good / len(RESULTS))
    assert s["slo_ms"] == slo


def test_tpot_property():
    assert RESULTS[0].tpot == pytest.approx(0.1)
    assert RESULTS[2].tpot is None and RESULTS[3].tpot is None


@pytest.mark.parametrize("intervals,peak", [
    ([], 0), ([(0, 1)], 1), ([(0, 1), (1, 2)], 1), ([(0, 2), (1, 3), (1.5, 1.6)], 3),
    ([(0, 1), (0.5, 2), (1.5, 3), (2.5, 4)], 2),
])
def test_peak_concurrency(intervals, peak):
    assert peak_concurrency(intervals) == peak


def test_parse_slo():
    assert parse_slo("ttft:200,tpot:50") == {"ttft": 200.0, "tpot": 50.0}
    assert parse_slo(["TTFT:1.5", "e2el:2000"]) == {"ttft": 1.5, "e2el": 2000.0}
    assert parse_slo(None) == {}
    for bad in ("foo:1", "ttft", "ttft:x", "ttft:-1"):
        with pytest.raises(ValueError, match="bad SLO"):
            parse_slo(bad)


def test_empty_run_does_not_crash():
    s = summarize([], 0.0, {"ttft": 1})
    assert s["completed"] == 0 and s["mean_ttft_ms"] == 0.0 and s["request_goodput"] == 0.0
    assert s["slo_attainment_pct"] == 0.0


def test_table_layout():
    text = format_table(summarize(RESULTS, DURATION, {"ttft": 250}))
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert "Successful requests:                     3" in text
    assert "Failed requests:                         1" in text
    assert "Request goodput (req/s):                 1.00" in text
    assert "Mean TTFT (ms):                          200.00" in text
    assert "P99 E2EL (ms):                           1186.00" in text
    for title in ("Time to First Token", "Time per Output Token (excl. 1st token)", "Inter-token Latency",
                  "End-to-end Latency"):
        assert title in text
    assert "goodput" not in format_table(summarize(RESULTS, DURATION))
