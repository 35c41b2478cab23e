"""The simulator's workload: a `Trace` of requests as numpy columns, and the pure transforms on it.

A trace is a structure of arrays (one row per request, sorted by arrival) so that a 1,000-instance,
4M-request run loads, windows and rescales in vectorized numpy instead of per-request Python objects.
File formats and synthetic generators live in `trace_formats.py`; this file owns the type.

Prefix block hashes (Mooncake) are stored CSR style, one flat id array plus offsets:

    request:      r0            r1       r2 (none)   r3
    ids:        [ 0  1  2  3 | 0  14  15 |          | 7 ]
    offsets:    [ 0,           4,        7,          7,   8 ]

so request i's hashes are `ids[offsets[i]:offsets[i + 1]]`; each id stands for one `block_size`-token
block of the prompt (512 in Mooncake), and equal ids mean the same prefix content.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MOONCAKE_BLOCK_SIZE = 512  # tokens per hash block in the Mooncake traces


def _frozen(values: np.ndarray, dtype: type, name: str) -> np.ndarray:
    """A read-only 1-D view, so that a frozen Trace cannot be changed through its arrays."""
    array = np.ascontiguousarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, slots=True, eq=False)
class PrefixHashes:
    """Per-request prefix block hash ids, CSR style (see the module docstring)."""

    ids: np.ndarray  # int64, all requests' ids back to back
    offsets: np.ndarray  # int64, len = num_requests + 1, offsets[0] == 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", _frozen(self.ids, np.int64, "prefix hash ids"))
        object.__setattr__(self, "offsets", _frozen(self.offsets, np.int64, "prefix hash offsets"))
        offsets = self.offsets
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(self.ids):
            raise ValueError("prefix hash offsets must start at 0 and end at len(ids)")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("prefix hash offsets must be non-decreasing")

    @staticmethod
    def empty(num_requests: int) -> PrefixHashes:
        return PrefixHashes(np.zeros(0, np.int64), np.zeros(num_requests + 1, np.int64))

    @staticmethod
    def from_lists(lists: list[list[int]]) -> PrefixHashes:
        lengths = np.fromiter((len(ids) for ids in lists), np.int64, len(lists))
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        flat = np.fromiter((i for ids in lists for i in ids), np.int64, int(offsets[-1]))
        return PrefixHashes(flat, offsets)

    @property
    def num_requests(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_blocks(self) -> np.ndarray:
        """Number of hash blocks of each request."""
        return np.diff(self.offsets)

    def __getitem__(self, request_index: int) -> np.ndarray:
        return self.ids[self.offsets[request_index] : self.offsets[request_index + 1]]

    def take(self, request_indices: np.ndarray) -> PrefixHashes:
        """The rows `request_indices` (any order, repeats allowed), gathered without a Python loop."""
        lengths = self.num_blocks[request_indices]
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        if offsets[-1] == 0:
            return PrefixHashes.empty(len(request_indices))
        # For each output id: its source row's start, minus where that row starts in the output.
        shift = np.repeat(self.offsets[:-1][request_indices] - offsets[:-1], lengths)
        return PrefixHashes(self.ids[np.arange(offsets[-1]) + shift], offsets)


@dataclass(frozen=True, slots=True, eq=False)
class Trace:
    """Requests sorted by arrival; time starts at 0 and `duration_s` is the last arrival's time."""

    arrival_s: np.ndarray  # float64, non-decreasing, >= 0
    num_prompt_tokens: np.ndarray  # int64, >= 0
    num_output_tokens: np.ndarray  # int64, >= 0
    prefix_hashes: PrefixHashes  # empty rows for traces without block hashes (Azure, synthetic)
    block_size: int = MOONCAKE_BLOCK_SIZE  # tokens per prefix hash block

    def __post_init__(self) -> None:
        for name, dtype in (("arrival_s", np.float64), ("num_prompt_tokens", np.int64),
                            ("num_output_tokens", np.int64)):
            object.__setattr__(self, name, _frozen(getattr(self, name), dtype, name))
        n = len(self.arrival_s)
        if not (len(self.num_prompt_tokens) == len(self.num_output_tokens) == n
                == self.prefix_hashes.num_requests):
            raise ValueError("trace columns must all have one entry per request")
        if n and (self.arrival_s[0] < 0 or np.any(np.diff(self.arrival_s) < 0)):
            raise ValueError("arrival_s must be sorted and >= 0; sort the requests by arrival")
        if np.any(self.num_prompt_tokens < 0) or np.any(self.num_output_tokens < 0):
            raise ValueError("token counts must be >= 0")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def has_prefix_hashes(self) -> bool:
        return len(self.prefix_hashes.ids) > 0

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def rate_per_s(self) -> float:
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0

    def take(self, request_indices: np.ndarray, arrival_s: np.ndarray) -> Trace:
        """Rows `request_indices` with new (sorted) arrival times."""
        return Trace(arrival_s, self.num_prompt_tokens[request_indices],
                     self.num_output_tokens[request_indices],
                     self.prefix_hashes.take(request_indices), self.block_size)

    def window(self, start_s: float, end_s: float) -> Trace:
        """Requests arriving in [start_s, end_s), re-timed so that start_s becomes 0."""
        if not 0 <= start_s <= end_s:
            raise ValueError(f"window needs 0 <= start_s <= end_s, got [{start_s}, {end_s})")
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end_s], side="left")
        rows = np.arange(lo, hi)
        return self.take(rows, self.arrival_s[lo:hi] - start_s)

    def scaled(self, rate_factor: float) -> Trace:
        """Time compression: the same requests `rate_factor` times faster (duration / rate_factor)."""
        if not rate_factor > 0:
            raise ValueError(f"rate_factor must be > 0, got {rate_factor}")
        return Trace(self.arrival_s / rate_factor, self.num_prompt_tokens, self.num_output_tokens,
                     self.prefix_hashes, self.block_size)

    def with_rate_multiplier(self, k: int, seed: int, share_prefixes: bool = True,
                             spread_s: float | None = None) -> Trace:
        """k superposed copies of the trace: k times the rate over the *same* duration.

        `scaled(200)` would squeeze an hour into 18 s, so a "1 hour at 200x rate" run instead overlays
        200 copies, copy j shifted by a seeded uniform offset in [0, spread_s) (default: the whole
        duration) and wrapped around the duration (copy 0 is the original, unshifted). Each copy keeps
        the trace's own burstiness and length mix; the wrap keeps the duration (max arrival <= the
        original's). Offsets over the whole duration flatten the trace's rate over time; a short
        `spread_s` (a minute) keeps its shape, which is what an autoscaler follows. With
        `share_prefixes`, copies keep their hash ids (the same conversations replayed by other users:
        an upper bound on prefix reuse); otherwise copy j's ids are offset to be distinct.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"rate multiplier must be an integer >= 1, got {k!r}")
        n, duration = len(self), self.duration_s
        if k == 1 or n == 0 or duration == 0:
            if k != 1 and n and duration == 0:
                raise ValueError("with_rate_multiplier needs a trace with duration > 0")
            return self
        if spread_s is not None and not 0 < spread_s <= duration:
            raise ValueError(f"spread_s must be in (0, {duration:g}] (the trace's duration), got {spread_s}")
        offsets = np.random.default_rng(seed).uniform(0.0, spread_s or duration, size=k)
        offsets[0] = 0.0
        shifted = self.arrival_s[None, :] + offsets[:, None]
        shifted[1:] = np.mod(shifted[1:], duration)
        order = np.argsort(shifted.ravel(), kind="stable")
        rows = order % n
        merged = self.take(rows, shifted.ravel()[order])
        if share_prefixes or not self.has_prefix_hashes:
            return merged
        id_span = int(self.prefix_hashes.ids.max()) + 1
        copy_of_id = np.repeat(order // n, merged.prefix_hashes.num_blocks)
        ids = merged.prefix_hashes.ids + copy_of_id * id_span
        return Trace(merged.arrival_s, merged.num_prompt_tokens, merged.num_output_tokens,
                     PrefixHashes(ids, merged.prefix_hashes.offsets), self.block_size)

    def describe(self) -> dict[str, float]:
        """Summary statistics, for logs and for checking a trace against its documentation."""
        out: dict[str, float] = {"num_requests": len(self), "duration_s": self.duration_s,
                                 "rate_per_s": self.rate_per_s}
        if len(self) > 2:
            gaps = np.diff(self.arrival_s)
            out["interarrival_cv"] = float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else 0.0
        for name, column in (("prompt", self.num_prompt_tokens), ("output", self.num_output_tokens)):
            if len(self):
                p50, p99 = np.percentile(column, [50, 99])
                out |= {f"{name}_tokens_mean": float(column.mean()), f"{name}_tokens_p50": float(p50),
                        f"{name}_tokens_p99": float(p99)}
        out["num_prefix_blocks"] = len(self.prefix_hashes.ids)
        return out
