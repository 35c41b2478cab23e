"""Where traces come from: the Azure CSV and Mooncake JSONL loaders, synthetic arrivals, `load_trace`.

Loaders validate as they parse and raise ValueError naming the file, the line and what to fix; the
real files are small (~20k rows), but parsing stays vectorized (numpy datetime64 on the timestamp
column, not a per-row strptime) so that much larger exports load in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from services.sim.traces import MOONCAKE_BLOCK_SIZE, PrefixHashes, Trace

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


def _sorted_trace(arrival_s: np.ndarray, prompt: np.ndarray, output: np.ndarray,
                  hashes: PrefixHashes) -> Trace:
    """Shift time to start at 0 and sort by arrival (stable, so file order breaks ties)."""
    order = np.argsort(arrival_s, kind="stable")
    arrival_s = arrival_s[order]
    start = arrival_s[0] if len(arrival_s) else 0.0
    return Trace(arrival_s - start, prompt[order], output[order], hashes.take(order), MOONCAKE_BLOCK_SIZE)


def _check_lengths(path: Path, name: str, values: np.ndarray, first_line: int) -> None:
    bad = np.flatnonzero(values < 0)
    if len(bad):
        raise ValueError(f"{path}:{first_line + bad[0]}: {name} is {values[bad[0]]}; "
                         f"token counts must be >= 0 (fix or drop that row)")


def load_azure_csv(path: str | Path) -> Trace:
    """Azure LLM inference trace: `TIMESTAMP,ContextTokens,GeneratedTokens`, absolute timestamps."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file; expected a header {','.join(AZURE_COLUMNS)}")
    header = [name.strip() for name in lines[0].split(",")]
    missing = [name for name in AZURE_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {missing}; header is {header}, "
                         f"expected {','.join(AZURE_COLUMNS)}")
    rows = [line.split(",") for line in lines[1:] if line.strip()]
    bad = next((i for i, row in enumerate(rows) if len(row) != len(header)), None)
    if bad is not None:
        raise ValueError(f"{path}:{bad + 2}: expected {len(header)} comma-separated fields, "
                         f"got {len(rows[bad])}")
    table = np.array(rows, dtype=str).reshape(len(rows), len(header))
    ts_col, prompt_col, output_col = (table[:, header.index(name)] for name in AZURE_COLUMNS)
    try:
        stamps = np.char.strip(ts_col).astype("datetime64[ns]")
    except ValueError:
        _raise_first_bad(path, ts_col, lambda s: np.datetime64(s.strip(), "ns"), "TIMESTAMP",
                         "an ISO time like 2023-11-16 18:15:46.6805900")
    prompt = _parse_ints(path, prompt_col, "ContextTokens")
    output = _parse_ints(path, output_col, "GeneratedTokens")
    _check_lengths(path, "ContextTokens", prompt, 2)
    _check_lengths(path, "GeneratedTokens", output, 2)
    nanos = stamps.astype(np.int64)
    arrival_s = (nanos - (nanos.min() if len(nanos) else 0)) / 1e9
    return _sorted_trace(arrival_s, prompt, output, PrefixHashes.empty(len(rows)))


def _parse_ints(path: Path, column: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.char.strip(column).astype(np.int64)
    except ValueError:
        _raise_first_bad(path, column, lambda s: int(s.strip()), name, "an integer token count")
        raise  # unreachable: _raise_first_bad always raises


def _raise_first_bad(path: Path, column: np.ndarray, parse, name: str, expected: str) -> None:
    """The vectorized parse failed: find the first bad row (slow path, error case only)."""
    for i, text in enumerate(column):
        try:
            parse(str(text))
        except ValueError:
            raise ValueError(f"{path}:{i + 2}: {name} {str(text)!r} is not {expected}") from None
    raise ValueError(f"{path}: could not parse column {name} as {expected}")


def _mooncake_row_problem(row: object) -> str | None:
    """What is wrong with one parsed Mooncake line, or None; all of it is bad data, so ValueError."""
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    missing = [key for key in MOONCAKE_KEYS if key not in row]
    if missing:
        return f"missing key(s) {missing}; each line needs {', '.join(MOONCAKE_KEYS)}"
    for key in ("input_length", "output_length"):
        if not isinstance(row[key], int) or row[key] < 0:
            return f"{key} is {row[key]!r}; it must be an integer >= 0"
    if not isinstance(row["hash_ids"], list):
        return "hash_ids must be a list of integer block ids"
    if not isinstance(row["timestamp"], (int, float)):
        return f"timestamp {row['timestamp']!r} must be a number (ms)"
    return None


def load_mooncake_jsonl(path: str | Path) -> Trace:
    """Mooncake trace: one JSON object a line, `timestamp` in ms, lengths, 512-token `hash_ids`."""
    path = Path(path)
    times, prompts, outputs, hashes = [], [], [], []
    with path.open() as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            problem = _mooncake_row_problem(row)
            if problem:
                raise ValueError(f"{path}:{line_no}: {problem}")
            times.append(row["timestamp"])
            prompts.append(row["input_length"])
            outputs.append(row["output_length"])
            hashes.append(row["hash_ids"])
    arrival_s = np.asarray(times, dtype=np.float64) / 1000.0
    return _sorted_trace(arrival_s, np.asarray(prompts, np.int64), np.asarray(outputs, np.int64),
                         PrefixHashes.from_lists(hashes))


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Token lengths: constant `mean` when cv == 0, else lognormal with that mean and cv; clipped to
    [1, max_tokens] and rounded."""

    mean: float
    cv: float = 0.0
    max_tokens: int = 32_768

    def __post_init__(self) -> None:
        if not (self.mean >= 1 and self.cv >= 0 and self.max_tokens >= 1):
            raise ValueError(f"LengthDist needs mean >= 1, cv >= 0, max_tokens >= 1; got {self}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.cv == 0:
            values = np.full(n, self.mean)
        else:
            sigma2 = np.log1p(self.cv**2)  # lognormal moments: cv^2 = exp(sigma^2) - 1
            values = rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2), n)
        return np.clip(np.rint(values), 1, self.max_tokens).astype(np.int64)


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """Synthetic workload; give exactly one of `num_requests` and `duration_s`.

    Inter-arrival gaps are exponential ('poisson', cv 1) or gamma with the given cv (cv > 1 is
    burstier than Poisson, cv < 1 smoother); the first request arrives at 0.
    """

    rate_per_s: float
    num_requests: int | None = None
    duration_s: float | None = None
    arrival: str = "poisson"
    cv: float = 1.0
    prompt: LengthDist = field(default_factory=lambda: LengthDist(1024, 1.0))
    output: LengthDist = field(default_factory=lambda: LengthDist(256, 1.0))
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise ValueError(f"synthetic rate must be > 0 requests/s, got {self.rate_per_s}")
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError("synthetic trace needs exactly one of num_requests and duration_s")
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError(f"arrival must be 'poisson' or 'gamma', got {self.arrival!r}")
        if not self.cv > 0:
            raise ValueError(f"gamma cv must be > 0, got {self.cv}")


def synthetic(spec: SyntheticSpec) -> Trace:
    """A seeded synthetic trace: same spec (seed included) gives identical arrays."""
    rng = np.random.default_rng(spec.seed)
    cv = 1.0 if spec.arrival == "poisson" else spec.cv
    shape = 1.0 / cv**2  # gamma with shape k has cv 1/sqrt(k); shape 1 is the exponential

    def gaps(n: int) -> np.ndarray:
        return rng.gamma(shape, 1.0 / (spec.rate_per_s * shape), n)

    if spec.num_requests is not None:
        arrival_s = np.concatenate(([0.0], np.cumsum(gaps(max(spec.num_requests - 1, 0)))))
        arrival_s = arrival_s[: spec.num_requests]
    else:
        expected = spec.rate_per_s * spec.duration_s
        arrival_s = np.concatenate(([0.0], np.cumsum(gaps(int(expected + 10 * np.sqrt(expected) * cv) + 16))))
        while arrival_s[-1] < spec.duration_s:  # rare: draw more until past the end
            arrival_s = np.concatenate((arrival_s, arrival_s[-1] + np.cumsum(gaps(len(arrival_s)))))
        arrival_s = arrival_s[arrival_s < spec.duration_s]
    n = len(arrival_s)
    return Trace(arrival_s, spec.prompt.sample(rng, n), spec.output.sample(rng, n), PrefixHashes.empty(n))


_SPEC_KEYS = {
    "rate": ("rate_per_s", float), "n": ("num_requests", int), "duration": ("duration_s", float),
    "arrival": ("arrival", str), "cv": ("cv", float), "seed": ("seed", int),
}
_LENGTH_KEYS = {"mean": float, "cv": float, "max": int}  # as prompt_mean=..., output_cv=...


def parse_synthetic(text: str) -> SyntheticSpec:
    """`rate=10,duration=60,arrival=gamma,cv=2,seed=0,prompt_mean=1024,prompt_cv=1,output_max=2048`."""
    allowed = sorted(_SPEC_KEYS) + [f"{w}_{k}" for w in ("prompt", "output") for k in _LENGTH_KEYS]
    kwargs: dict = {}
    lengths: dict[str, dict] = {"prompt": {}, "output": {}}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"synthetic trace spec: bad item {item!r}; use key=value with keys {allowed}")
        try:
            if key in _SPEC_KEYS:
                kwargs[_SPEC_KEYS[key][0]] = _SPEC_KEYS[key][1](value)
            else:
                which, _, sub = key.partition("_")
                lengths[which][sub] = _LENGTH_KEYS[sub](value)
        except ValueError:
            raise ValueError(f"synthetic trace spec: {key}={value!r} is not a valid number") from None
    if "rate_per_s" not in kwargs:
        raise ValueError("synthetic trace spec needs rate=<requests per second>")
    defaults = {f.name: f.default_factory() for f in fields(SyntheticSpec) if f.name in lengths}
    for which, given in lengths.items():
        base = defaults[which]
        kwargs[which] = LengthDist(given.get("mean", base.mean), given.get("cv", base.cv),
                                   given.get("max", base.max_tokens))
    return SyntheticSpec(**kwargs)


def load_trace(spec: str) -> Trace:
    """`path.csv` (Azure), `path.jsonl` (Mooncake) or `synthetic:key=value,...` (see parse_synthetic)."""
    if spec.startswith("synthetic:"):
        return synthetic(parse_synthetic(spec.removeprefix("synthetic:")))
    path = Path(spec)
    loaders = {".csv": load_azure_csv, ".jsonl": load_mooncake_jsonl}
    if path.suffix not in loaders:
        raise ValueError(f"trace {spec!r}: unknown format; give a .csv (Azure) or .jsonl (Mooncake) "
                         "file, or synthetic:rate=10,duration=60,...")
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    return loaders[path.suffix](path)
