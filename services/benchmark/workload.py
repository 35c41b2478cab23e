"""Request specs for a benchmark run: synthetic (fixed lengths) or replayed from a trace (pure code).

Each :class:`RequestSpec` says when to send (``arrival``, seconds after the run starts), how long the
prompt is and how many tokens to force. Prompts are token-id lists (exact length without a tokenizer)
or, for chat endpoints, text of roughly ``input_len`` words.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

DEFAULT_VOCAB_RANGE = (1000, 30000)
# Common short English words: one word is about one token for most tokenizers.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "her", "it", "an", "were", "are", "which", "this", "be", "or", "has", "had",
    "not", "but", "also", "first", "one", "their", "its", "new", "after", "who", "they", "have",
    "two", "been", "other", "all", "year", "into", "more", "time", "when", "city", "over", "up",
    "some", "during", "there", "would", "most", "only", "can", "about", "than", "three", "may",
    "used", "out", "so", "school", "world", "many", "later", "while", "where", "state", "such",
    "these", "made", "under", "part", "known", "between", "them", "both", "work", "war", "early",
    "name", "then", "being", "well", "several", "since", "through", "before", "what", "high",
    "each", "game", "day",
)


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace: seconds since the trace's first row and the recorded lengths."""

    time: float
    input_len: int
    output_len: int


@dataclass
class RequestSpec:
    index: int
    arrival: float  # seconds after the run starts
    input_len: int
    output_len: int
    prompt: list[int] | str


def _timestamp_parts(text: str) -> tuple[int, float]:
    main, _, frac = text.strip().partition(".")
    seconds = int(datetime.strptime(main, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp())
    return seconds, (float(f"0.{frac}") if frac else 0.0)


def parse_timestamp(text: str) -> float:
    """``2023-11-16 18:15:46.6805900`` → POSIX seconds (UTC; any number of fractional digits)."""
    seconds, frac = _timestamp_parts(text)
    return seconds + frac


def load_trace(path: str | Path) -> list[TraceRow]:
    """Read an Azure LLM trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``), times relative to row 1."""
    path = Path(path)
    rows: list[tuple[tuple[int, float], int, int]] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace (missing columns {sorted(missing)})")
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append((_timestamp_parts(rec["TIMESTAMP"]), int(rec["ContextTokens"]),
                             int(rec["GeneratedTokens"])))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: bad row ({exc})") from None
    if not rows:
        raise ValueError(f"{path}: the trace has no rows")
    rows.sort(key=lambda r: r[0])
    (s0, f0) = rows[0][0]
    # Whole seconds and fractions apart: POSIX seconds as one float would lose ~0.2 us.
    return [TraceRow((s - s0) + (f - f0), i, o) for (s, f), i, o in rows]


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Arrival times of ``n`` requests: the first at 0, then exponential gaps of mean 1/rate.

    ``rate`` = inf sends everything at once (all arrivals 0).
    """
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("request rate must be > 0")
    gaps = rng.exponential(1.0 / rate, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def scale_length(length: int, scale: float, cap: int | None) -> int:
    """``length * scale`` rounded, at least 1, at most ``cap``."""
    value = max(1, round(length * scale))
    return min(value, cap) if cap is not None else value


def random_token_ids(n: int, vocab_range: tuple[int, int], rng: np.random.Generator) -> list[int]:
    lo, hi = vocab_range
    return rng.integers(lo, hi, size=n).tolist()


def random_text(n_words: int, rng: np.random.Generator) -> str:
    idx = rng.integers(0, len(_WORDS), size=max(1, n_words))
    return " ".join(_WORDS[i] for i in idx)


def make_prompt(input_len: int, rng: np.random.Generator, *, chat: bool,
                vocab_range: tuple[int, int] = DEFAULT_VOCAB_RANGE) -> list[int] | str:
    return random_text(input_len, rng) if chat else random_token_ids(input_len, vocab_range, rng)


def select_trace_rows(rows: list[TraceRow], num_prompts: int | None, start: int | str = 0,
                      seed: int = 0) -> list[TraceRow]:
    """A contiguous window of ``num_prompts`` rows from row ``start`` (``"random"``: a seeded start).

    Times are re-based so the window's first row is at 0.
    """
    n = len(rows) if num_prompts is None else min(num_prompts, len(rows))
    if start == "random":
        first = int(np.random.default_rng(seed).integers(0, len(rows) - n + 1))
    else:
        first = int(start)
        if not 0 <= first < len(rows):
            raise ValueError(f"trace start {first} is outside the trace (0..{len(rows) - 1})")
    window = rows[first:first + n]
    t0 = window[0].time
    return [TraceRow(r.time - t0, r.input_len, r.output_len) for r in window]


def trace_workload(rows: list[TraceRow], *, num_prompts: int | None = None, start: int | str = 0,
                   seed: int = 0, time_scale: float = 1.0, length_scale: float = 1.0,
                   max_input_len: int | None = None, max_output_len: int | None = None,
                   request_rate: float | None = None, chat: bool = False,
                   vocab_range: tuple[int, int] = DEFAULT_VOCAB_RANGE) -> list[RequestSpec]:
    """Replay trace rows: arrivals from the timestamps (gaps × ``time_scale``) or Poisson at
    ``request_rate``; lengths × ``length_scale`` (min 1), capped."""
    if time_scale < 0 or length_scale <= 0:
        raise ValueError("time scale must be >= 0 and length scale > 0")
    window = select_trace_rows(rows, num_prompts, start, seed)
    rng = np.random.default_rng(seed)
    if request_rate is not None:
        arrivals = poisson_arrivals(len(window), request_rate, rng)
    else:
        arrivals = [r.time * time_scale for r in window]
    specs = []
    for i, (row, arrival) in enumerate(zip(window, arrivals, strict=True)):
        in_len = scale_length(row.input_len, length_scale, max_input_len)
        out_len = scale_length(row.output_len, length_scale, max_output_len)
        specs.append(RequestSpec(i, arrival, in_len, out_len,
                                 make_prompt(in_len, rng, chat=chat, vocab_range=vocab_range)))
    return specs


def synthetic_workload(*, num_prompts: int, input_len: int, output_len: int, request_rate: float = math.inf,
                       seed: int = 0, chat: bool = False,
                       vocab_range: tuple[int, int] = DEFAULT_VOCAB_RANGE) -> list[RequestSpec]:
    """``num_prompts`` requests of fixed lengths, Poisson arrivals at ``request_rate`` (inf: all at once)."""
    if input_len < 1 or output_len < 1:
        raise ValueError("input and output lengths must be >= 1")
    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(num_prompts, request_rate, rng)
    return [RequestSpec(i, t, input_len, output_len,
                        make_prompt(input_len, rng, chat=chat, vocab_range=vocab_range))
            for i, t in enumerate(arrivals)]
