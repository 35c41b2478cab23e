"""Per-key rate limits: one token bucket per (key, what is counted), pure (time comes in as `now`).

A limit of N per minute is a bucket that holds at most N and refills at N/60 per second, so a key may
spend its whole minute in a burst and then gets N/60 per second:

    level ▲ N ─────╮          ╭───────── full again (N / rate seconds after it emptied)
          │        │ burst   ╱  refill at N/60 per second
          │        ╰────────╯
          └─────────────────────────▶ time

`try_take` either takes `cost` from the bucket or, when the bucket holds less, takes nothing and says
how long until `cost` fits (None when it never can: `cost` is more than the whole minute's limit).
`judge` is that decision alone, shared with the Redis buckets of rate_limit_redis.py; `LocalBuckets`
are the buckets of one gateway process, as the gateway's access control asks for them.
"""
from __future__ import annotations

import time
from collections.abc import Callable
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


def judge(level: float, per_minute: int, cost: int, allowed: bool | None = None) -> Decision:
    """The decision for `cost` against a bucket holding `level` before the take (`allowed`: taken
    elsewhere, by the shared buckets' script)."""
    rate = per_minute / 60.0
    if cost <= level if allowed is None else allowed:
        level -= cost
        return Decision(True, per_minute, int(level), 0.0, (per_minute - level) / rate)
    retry = (cost - level) / rate if cost <= per_minute else None
    return Decision(False, per_minute, int(level), retry, (per_minute - level) / rate)


def check(per_minute: int, cost: int) -> None:
    if per_minute <= 0:
        raise ValueError(f"a rate limit must be > 0 per minute, got {per_minute}")
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost}")


class RateLimiter:
    """Token buckets by id, e.g. ("team-a", "requests"). Holds one bucket per id it has seen; `retain`
    forgets the buckets of keys that are gone."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def try_take(self, bucket_id: tuple[str, str], per_minute: int, cost: int, now: float) -> Decision:
        check(per_minute, cost)
        level = self._level(bucket_id, per_minute, now)
        decision = judge(level, per_minute, cost)
        self._buckets[bucket_id] = Bucket(level - cost if decision.is_allowed else level, now)
        return decision

    def retain(self, names: set[str]) -> None:
        """Forget the buckets of every key not in `names` (a key removed from the keys file)."""
        self._buckets = {bid: b for bid, b in self._buckets.items() if bid[0] in names}

    def _level(self, bucket_id: tuple[str, str], per_minute: int, now: float) -> float:
        bucket = self._buckets.get(bucket_id)
        if bucket is None:
            return float(per_minute)                        # a new key starts with its whole minute
        elapsed = max(0.0, now - bucket.updated_s)          # a clock that steps back refills nothing
        return min(float(per_minute), bucket.level + elapsed * per_minute / 60.0)


class LocalBuckets:
    """The buckets of this gateway process alone (one gateway, or each replica its own limit)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = RateLimiter()
        self.clock = clock

    async def take(self, bucket_id: tuple[str, str], per_minute: int, cost: int) -> Decision:
        return self.limiter.try_take(bucket_id, per_minute, cost, self.clock())

    def retain(self, names: set[str]) -> None:
        self.limiter.retain(names)
