"""Rate-limit buckets shared by every gateway replica, in Redis (`--rate-limit-redis-url`).

Without it each replica keeps its own buckets, so N replicas let a key through N times its limit. Here
a bucket is one Redis hash, `ferry:gateway:ratelimit:<key name>:<requests|tokens>` = {level, updated},
read, refilled and taken from by one Lua script, atomically, on Redis's clock (replicas' clocks may
disagree). It expires once it would be full again, so an absent bucket means a full one and Redis holds
only the keys in use.

When Redis cannot be reached (`timeout_s`) the decision is taken by this replica's own buckets and Redis
is left alone for `retry_after_s` (a dead Redis costs one timeout, not one per request): limits hold per
replica meanwhile. `ferry_gateway_rate_limit_shared` says which (1 Redis, 0 this replica alone).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway.rate_limit import Decision, LocalBuckets, check, judge

log = logging.getLogger("ferry.gateway")
PREFIX = "ferry:gateway:ratelimit:"

# KEYS[1]: the bucket; ARGV: per_minute, cost. Returns {taken (0|1), level before the take (a string:
# Redis truncates Lua numbers to integers)}.
TAKE = """
local per_minute, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate = per_minute / 60.0
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'level', 'updated')
local level = per_minute
if bucket[1] then
  level = math.min(per_minute, tonumber(bucket[1]) + math.max(0, now - tonumber(bucket[2])) * rate)
end
local before, taken = level, 0
if cost <= level then level = level - cost; taken = 1 end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((per_minute - level) / rate * 1000) + 1000)
return {taken, tostring(before)}
"""


class RedisBuckets:
    def __init__(self, url: str, *, timeout_s: float = 0.25, retry_after_s: float = 5.0,
                 on_shared: Callable[[bool], None] = lambda shared: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.take_script = self.redis.register_script(TAKE)
        self.local = LocalBuckets(clock)
        self.retry_after_s = retry_after_s
        self.on_shared = on_shared
        self.clock = clock
        self._down_until = 0.0

    async def take(self, bucket_id: tuple[str, str], per_minute: int, cost: int) -> Decision:
        check(per_minute, cost)
        if self.clock() >= self._down_until:
            try:
                taken, before = await self.take_script(keys=[PREFIX + ":".join(bucket_id)], args=[per_minute, cost])
            except (RedisError, OSError) as e:
                log.warning("rate limits: Redis unreachable (%s); each replica limits alone for %.0f s",
                            type(e).__name__, self.retry_after_s)
                self._down_until = self.clock() + self.retry_after_s
            else:
                self.on_shared(True)
                return judge(float(before), per_minute, cost, allowed=bool(taken))
        self.on_shared(False)
        return await self.local.take(bucket_id, per_minute, cost)

    def retain(self, names: set[str]) -> None:
        """A removed key's buckets in Redis expire by themselves within a minute."""
        self.local.retain(names)

    async def close(self) -> None:
        await self.redis.aclose()
