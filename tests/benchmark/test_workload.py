"""Workload generation: trace parsing and scaling, caps, windows, Poisson arrivals, prompts."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from services.benchmark import workload as wl

REAL_TRACE = Path("/work/shared/data/traces/azure_llm_2023_conv.csv")
if not REAL_TRACE.is_file():
    REAL_TRACE = Path(__file__).resolve().parents[2] / "../shared/data/traces/azure_llm_2023_conv.csv"

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.5000000,400,40
2023-11-16 18:15:47.0000000,100,11
2023-11-16 18:15:49.2500000,3000,600
2023-11-16 18:15:50.5000000,1,1
2023-11-16 18:15:56.5000000,50,7
"""


@pytest.fixture
def trace(tmp_path) -> list[wl.TraceRow]:
    path = tmp_path / "t.csv"
    path.write_text(CSV)
    return wl.load_trace(path)


def test_parse_timestamp_keeps_all_fraction_digits():
    a = wl.parse_timestamp("2023-11-16 18:15:46.6805900")
    b = wl.parse_timestamp("2023-11-16 18:15:50.9951690")
    assert b - a == pytest.approx(4.314579, abs=1e-6)
    assert wl.parse_timestamp("2023-11-16 18:15:47") - a == pytest.approx(0.31941, abs=1e-6)


def test_load_trace_relative_times_and_lengths(trace):
    assert [r.time for r in trace] == pytest.approx([0.0, 0.5, 2.75, 4.0, 10.0])
    assert [(r.input_len, r.output_len) for r in trace] == [(400, 40), (100, 11), (3000, 600), (1, 1), (50, 7)]


def test_load_trace_rejects_other_csv(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        wl.load_trace(path)


@pytest.mark.skipif(not REAL_TRACE.is_file(), reason="shared traces not present")
def test_real_azure_trace_parses():
    rows = wl.load_trace(REAL_TRACE)
    assert len(rows) == 19366
    assert rows[0] == wl.TraceRow(0.0, 374, 44)
    assert rows[1].time == pytest.approx(4.314579, abs=1e-9)
    assert 3400 < rows[-1].time < 3600  # ~58 min


def test_trace_replay_time_and_length_scaling(trace):
    specs = wl.trace_workload(trace, time_scale=0.5, length_scale=0.1)
    assert [s.arrival for s in specs] == pytest.approx([0.0, 0.25, 1.375, 2.0, 5.0])
    assert [(s.input_len, s.output_len) for s in specs] == [(40, 4), (10, 1), (300, 60), (1, 1), (5, 1)]
    assert [len(s.prompt) for s in specs] == [s.input_len for s in specs]
    assert [s.index for s in specs] == list(range(5))


def test_trace_caps_and_first_n(trace):
    specs = wl.trace_workload(trace, num_prompts=3, max_input_len=256, max_output_len=32)
    assert [(s.input_len, s.output_len) for s in specs] == [(256, 32), (100, 11), (256, 32)]
    assert [s.arrival for s in specs] == pytest.approx([0.0, 0.5, 2.75])


def test_trace_window_start_rebases_times(trace):
    specs = wl.trace_workload(trace, num_prompts=2, start=2)
    assert [s.arrival for s in specs] == pytest.approx([0.0, 1.25])
    assert [s.input_len for s in specs] == [3000, 1]
    with pytest.raises(ValueError):
        wl.trace_workload(trace, start=5)


def test_trace_random_window_is_seeded(trace):
    a = wl.select_trace_rows(trace, 2, "random", seed=1)
    b = wl.select_trace_rows(trace, 2, "random", seed=1)
    assert a == b and len(a) == 2 and a[0].time == 0.0
    starts = {wl.select_trace_rows(trace, 2, "random", seed=s)[0].input_len for s in range(30)}
    assert len(starts) > 1  # different seeds pick different windows


def test_trace_request_rate_overrides_timestamps(trace):
    specs = wl.trace_workload(trace, request_rate=math.inf)
    assert [s.arrival for s in specs] == [0.0] * 5
    specs = wl.trace_workload(trace, request_rate=2.0, seed=3)
    arrivals = [s.arrival for s in specs]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert arrivals != pytest.approx([0.0, 0.5, 2.75, 4.0, 10.0])


def test_poisson_rate_is_statistically_close():
    rng = np.random.default_rng(0)
    arrivals = wl.poisson_arrivals(20000, 10.0, rng)
    gaps = np.diff(arrivals)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    assert (len(arrivals) - 1) / arrivals[-1] == pytest.approx(10.0, rel=0.03)


def test_poisson_seeded_and_inf():
    a = wl.poisson_arrivals(10, 5.0, np.random.default_rng(7))
    b = wl.poisson_arrivals(10, 5.0, np.random.default_rng(7))
    assert a == b
    assert wl.poisson_arrivals(4, math.inf, np.random.default_rng(0)) == [0.0] * 4
    assert wl.poisson_arrivals(0, 1.0, np.random.default_rng(0)) == []
    with pytest.raises(ValueError):
        wl.poisson_arrivals(3, 0.0, np.random.default_rng(0))


def test_synthetic_workload_prompts_and_lengths():
    specs = wl.synthetic_workload(num_prompts=50, input_len=32, output_len=8, request_rate=math.inf, seed=1,
                                  vocab_range=(100, 200))
    assert len(specs) == 50 and all(s.arrival == 0.0 for s in specs)
    assert all(s.input_len == 32 and s.output_len == 8 and len(s.prompt) == 32 for s in specs)
    ids = np.array([s.prompt for s in specs])
    assert ids.min() >= 100 and ids.max() < 200
    assert specs[0].prompt != specs[1].prompt
    again = wl.synthetic_workload(num_prompts=50, input_len=32, output_len=8, seed=1, vocab_range=(100, 200))
    assert [s.prompt for s in again] == [s.prompt for s in specs]


def test_synthetic_chat_prompt_is_text_of_input_len_words():
    specs = wl.synthetic_workload(num_prompts=3, input_len=40, output_len=4, request_rate=2.0, chat=True)
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 40 for s in specs)
    assert specs[0].arrival == 0.0 and specs[1].arrival > 0


def test_scale_length_min_one_and_cap():
    assert wl.scale_length(10, 0.01, None) == 1
    assert wl.scale_length(10, 2.0, None) == 20
    assert wl.scale_length(10, 2.0, 15) == 15
