"""Per-key rate limits: one token bucket per (key, what is counted), pure (time comes in as `now`).

A limit of N per minute is a bucket that holds at most N and refills at N/60 per second, so a key may
spend its whole minute in a burst and then gets N/60 per second:

    level ▲ N ─────╮          ╭───────── full again (N / rate seconds after it emptied)
          │        │ burst   ╱  refill at N/60 per second
          │        ╰────────╯
          └─────────────────────────▶ time

`try_take` either takes `cost` from the bucket or, when the bucket holds less, takes nothing and says
how long until `cost` fits (None when it never can: `cost` is more than the whole minute's limit).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Bucket:
    level: float        # units available at `updated_s`
    updated_s: float


@dataclass(frozen=True, slots=True)
class Decision:
    is_allowed: bool
    limit: int                      # per minute
    remaining: int                  # whole units left after this decision
    retry_after_s: float | None     # not allowed: seconds until `cost` fits (None: never); allowed: 0
    reset_s: float                  # seconds until the bucket is full again


class RateLimiter:
    """Token buckets by id, e.g. ("team-a", "requests"). Holds one bucket per id it has seen; `retain`
    forgets the buckets of keys that are gone."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def try_take(self, bucket_id: tuple[str, str], per_minute: int, cost: int, now: float) -> Decision:
        if per_minute <= 0:
            raise ValueError(f"a rate limit must be > 0 per minute, got {per_minute}")
        if cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        rate = per_minute / 60.0
        level = self._level(bucket_id, per_minute, rate, now)
        if cost <= level:
            level -= cost
            self._buckets[bucket_id] = Bucket(level, now)
            return Decision(True, per_minute, int(level), 0.0, (per_minute - level) / rate)
        self._buckets[bucket_id] = Bucket(level, now)
        retry = (cost - level) / rate if cost <= per_minute else None
        return Decision(False, per_minute, int(level), retry, (per_minute - level) / rate)

    def retain(self, names: set[str]) -> None:
        """Forget the buckets of every key not in `names` (a key removed from the keys file)."""
        self._buckets = {bid: b for bid, b in self._buckets.items() if bid[0] in names}

    def _level(self, bucket_id: tuple[str, str], per_minute: int, rate: float, now: float) -> float:
        bucket = self._buckets.get(bucket_id)
        if bucket is None:
            return float(per_minute)                        # a new key starts with its whole minute
        elapsed = max(0.0, now - bucket.updated_s)          # a clock that steps back refills nothing
        return min(float(per_minute), bucket.level + elapsed * rate)
