"""Trace loading, synthetic generation and the pure transforms on `Trace`."""

import time
from pathlib import Path

import numpy as np
import pytest

from services.sim.trace_formats import (
    LengthDist,
    SyntheticSpec,
    load_azure_csv,
    load_mooncake_jsonl,
    load_trace,
    parse_synthetic,
    synthetic,
)
from services.sim.traces import PrefixHashes, Trace

REAL_TRACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "traces"

# First lines of the real files, copied by hand (the CI clone has no ../shared).
AZURE_CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
2023-11-16 18:15:51.3910170,91,16
"""
MOONCAKE_JSONL = """{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]}
{"timestamp": 0, "input_length": 2290, "output_length": 316, "hash_ids": [0, 42, 43, 44, 45]}
{"timestamp": 1500, "input_length": 7322, "output_length": 490, "hash_ids": [0, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def small_trace() -> Trace:
    return Trace(np.array([0.0, 1.0, 2.0, 3.0]), np.array([10, 20, 30, 40]), np.array([1, 2, 3, 4]),
                 PrefixHashes.from_lists([[0, 1], [], [0, 2, 3], [4]]))


def test_load_azure_csv(tmp_path):
    trace = load_azure_csv(write(tmp_path, "a.csv", AZURE_CSV))
    np.testing.assert_allclose(trace.arrival_s, [0.0, 4.314579, 4.541877, 4.710427], atol=1e-9)
    assert trace.num_prompt_tokens.tolist() == [374, 396, 879, 91]
    assert trace.num_output_tokens.tolist() == [44, 109, 55, 16]
    assert not trace.has_prefix_hashes and trace.prefix_hashes.num_requests == 4
    assert trace.num_prompt_tokens.dtype == np.int64 and trace.arrival_s.dtype == np.float64


def test_load_mooncake_jsonl(tmp_path):
    trace = load_mooncake_jsonl(write(tmp_path, "m.jsonl", MOONCAKE_JSONL))
    assert trace.arrival_s.tolist() == [0.0, 0.0, 1.5]  # ms -> s
    assert trace.num_prompt_tokens.tolist() == [6758, 2290, 7322]
    assert trace.prefix_hashes[1].tolist() == [0, 42, 43, 44, 45]
    assert trace.prefix_hashes.num_blocks.tolist() == [14, 5, 15]
    assert trace.block_size == 512


def test_loaders_sort_by_arrival_and_start_at_zero(tmp_path):
    lines = AZURE_CSV.splitlines()
    shuffled = "\n".join([lines[0], lines[3], lines[1], lines[4], lines[2]])
    trace = load_azure_csv(write(tmp_path, "s.csv", shuffled))
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.num_prompt_tokens.tolist() == [374, 396, 879, 91]


@pytest.mark.parametrize("name, text, message", [
    ("cols.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,1\n", "cols.csv:1: missing column"),
    ("neg.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,2\n2023-11-16 18:15:47,-5,2\n",
     "neg.csv:3: ContextTokens is -5"),
    ("ts.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n", "ts.csv:2: TIMESTAMP 'yesterday'"),
    ("int.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,x\n", "int.csv:2: GeneratedTokens"),
    ("fields.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1\n", "fields.csv:2: expected 3"),
    ("empty.csv", "", "empty.csv: empty file"),
    ("key.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n', "key.jsonl:1: missing key"),
    ("neg.jsonl", MOONCAKE_JSONL + '{"timestamp": 9, "input_length": 1, "output_length": -1, "hash_ids": []}\n',
     "neg.jsonl:4: output_length is -1"),
    ("json.jsonl", "{not json\n", "json.jsonl:1: not valid JSON"),
    ("list.jsonl", "[1, 2]\n", "list.jsonl:1: each line must be a JSON object"),
    ("hash.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": 3}\n',
     "hash.jsonl:1: hash_ids"),
])
def test_bad_files_name_file_line_and_fix(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_trace(str(write(tmp_path, name, text)))


@pytest.mark.parametrize("spec, message", [
    ("trace.parquet", "unknown format"),
    ("missing.csv", "does not exist"),
    ("synthetic:duration=60", "needs rate="),
    ("synthetic:rate=10", "exactly one of num_requests and duration_s"),
    ("synthetic:rate=10,n=5,duration=6", "exactly one of"),
    ("synthetic:rate=10,n=5,colour=red", "bad item 'colour=red'"),
    ("synthetic:rate=fast,n=5", "rate='fast' is not a valid number"),
    ("synthetic:rate=10,n=5,arrival=weibull", "'poisson' or 'gamma'"),
    ("synthetic:rate=-1,n=5", "rate must be > 0"),
    ("synthetic:rate=1,n=5,prompt_mean=0", "LengthDist needs mean >= 1"),
])
def test_load_trace_rejects_bad_specs(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_trace(spec)


def test_synthetic_spec_string():
    spec = parse_synthetic("rate=10,duration=60,arrival=gamma,cv=2,seed=3,prompt_mean=100,output_cv=0")
    assert (spec.rate_per_s, spec.duration_s, spec.arrival, spec.cv, spec.seed) == (10, 60, "gamma", 2, 3)
    assert spec.prompt.mean == 100 and spec.output.cv == 0
    trace = load_trace("synthetic:rate=10,duration=60,seed=1")
    assert trace.arrival_s[0] == 0 and trace.arrival_s[-1] < 60 and 450 < len(trace) < 750


def arrays(trace: Trace) -> tuple:
    return trace.arrival_s, trace.num_prompt_tokens, trace.num_output_tokens


def test_synthetic_same_seed_same_arrays_different_seed_differs():
    spec = SyntheticSpec(rate_per_s=50, num_requests=1000, arrival="gamma", cv=3, seed=7)
    a, b = synthetic(spec), synthetic(spec)
    c = synthetic(SyntheticSpec(rate_per_s=50, num_requests=1000, arrival="gamma", cv=3, seed=8))
    for x, y, z in zip(arrays(a), arrays(b), arrays(c)):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)


@pytest.mark.parametrize("arrival, cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 2.0), ("gamma", 4.0)])
def test_synthetic_interarrival_cv_and_rate(arrival, cv):
    trace = synthetic(SyntheticSpec(rate_per_s=100, num_requests=200_000, arrival=arrival, cv=cv, seed=0))
    stats = trace.describe()
    assert stats["interarrival_cv"] == pytest.approx(cv, rel=0.1)
    assert stats["rate_per_s"] == pytest.approx(100, rel=0.1)


@pytest.mark.parametrize("dist, mean, cv", [
    (LengthDist(300), 300, 0.0),
    (LengthDist(300, cv=1.5), 300, 1.5),
    (LengthDist(300, cv=1.0, max_tokens=400), None, None),  # clipped: only the bounds hold
])
def test_length_distributions(dist, mean, cv):
    values = dist.sample(np.random.default_rng(0), 100_000)
    assert values.min() >= 1 and values.max() <= dist.max_tokens
    if mean is not None:
        assert values.mean() == pytest.approx(mean, rel=0.05)
        assert values.std() / values.mean() == pytest.approx(cv, rel=0.15, abs=1e-9)


def test_synthetic_duration_mode_covers_the_duration():
    trace = synthetic(SyntheticSpec(rate_per_s=20, duration_s=300, seed=0))
    assert trace.duration_s < 300 and trace.duration_s > 299 and len(trace) == pytest.approx(6000, rel=0.1)


def test_window_rebases_and_keeps_rows():
    window = small_trace().window(1.0, 3.0)
    assert window.arrival_s.tolist() == [0.0, 1.0]
    assert window.num_prompt_tokens.tolist() == [20, 30]
    assert [window.prefix_hashes[i].tolist() for i in range(2)] == [[], [0, 2, 3]]
    assert len(small_trace().window(5, 9)) == 0
    with pytest.raises(ValueError, match="start_s <= end_s"):
        small_trace().window(3, 1)


def test_scaled_compresses_time():
    trace = small_trace()
    fast = trace.scaled(2.0)
    assert fast.arrival_s.tolist() == [0.0, 0.5, 1.0, 1.5]
    assert fast.rate_per_s == pytest.approx(2 * trace.rate_per_s)
    np.testing.assert_array_equal(fast.num_prompt_tokens, trace.num_prompt_tokens)
    with pytest.raises(ValueError, match="rate_factor"):
        trace.scaled(0)


def test_rate_multiplier_keeps_duration_and_every_copy():
    trace = synthetic(SyntheticSpec(rate_per_s=5, duration_s=600, seed=1))
    big = trace.with_rate_multiplier(10, seed=0)
    assert len(big) == 10 * len(trace) and big.duration_s <= trace.duration_s
    assert np.all(np.diff(big.arrival_s) >= 0) and big.arrival_s[0] >= 0
    assert sorted(big.num_prompt_tokens.tolist()) == sorted(trace.num_prompt_tokens.tolist() * 10)
    np.testing.assert_array_equal(trace.with_rate_multiplier(10, seed=0).arrival_s, big.arrival_s)
    assert not np.array_equal(trace.with_rate_multiplier(10, seed=1).arrival_s, big.arrival_s)
    assert trace.with_rate_multiplier(1, seed=0) is trace
    with pytest.raises(ValueError, match="integer >= 1"):
        trace.with_rate_multiplier(0, seed=0)


def test_rate_multiplier_prefixes_shared_or_distinct():
    trace = small_trace()
    shared = trace.with_rate_multiplier(3, seed=0)
    distinct = trace.with_rate_multiplier(3, seed=0, share_prefixes=False)
    np.testing.assert_array_equal(shared.prefix_hashes.offsets, distinct.prefix_hashes.offsets)
    assert set(shared.prefix_hashes.ids.tolist()) == {0, 1, 2, 3, 4}
    assert len(set(distinct.prefix_hashes.ids.tolist())) == 15
    np.testing.assert_array_equal(distinct.prefix_hashes.ids % 5, shared.prefix_hashes.ids)


def test_trace_is_frozen_and_validated():
    trace = small_trace()
    with pytest.raises(ValueError):
        trace.arrival_s[0] = 5.0  # read-only array
    with pytest.raises(ValueError, match="sorted"):
        Trace(np.array([1.0, 0.0]), np.array([1, 1]), np.array([1, 1]), PrefixHashes.empty(2))
    with pytest.raises(ValueError, match="one entry per request"):
        Trace(np.array([0.0]), np.array([1, 1]), np.array([1]), PrefixHashes.empty(1))
    assert small_trace().describe()["num_requests"] == 4 and len(Trace(
        np.zeros(0), np.zeros(0), np.zeros(0), PrefixHashes.empty(0))) == 0


@pytest.mark.skipif(not REAL_TRACES.is_dir(), reason="real traces live in ../shared/data/traces (absent)")
def test_real_traces_load_and_scale_to_200x():
    azure = load_trace(str(REAL_TRACES / "azure_llm_2023_conv.csv"))
    assert 19_000 < len(azure) < 20_000 and 3300 < azure.duration_s < 3700
    start = time.perf_counter()
    big = azure.with_rate_multiplier(200, seed=0)
    elapsed = time.perf_counter() - start
    assert 3.8e6 < len(big) < 4.0e6 and elapsed < 5.0
    assert big.duration_s == pytest.approx(azure.duration_s, rel=0.01)
    mooncake = load_trace(str(REAL_TRACES / "mooncake_conversation.jsonl"))
    assert 12_000 < len(mooncake) < 12_100 and mooncake.has_prefix_hashes
