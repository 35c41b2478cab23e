"""The registry in Redis, so a restarted scheduler still knows the instances (`--redis-url`).

    HASH ferry:instances    field = instance id
                            value = JSON {"v": 1, "spec": {...}, "load": {...}, "last_heartbeat": t}

Register and deregister write through at once (they are rare and change who exists). Heartbeats only
mark the instance dirty; `flush` writes the dirty ones in one pipeline and the server calls it at
most every `flush_interval_s`, so Redis sees a bounded write rate however many workers beat. The
in-memory registry stays the truth while running: a Redis error is logged and the write is retried
at the next flush, never failing an RPC. `last_heartbeat` is wall-clock time, so a scheduler that
loads an old entry sees its true age (and treats the instance as unhealthy until it beats again).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.cluster import (
    InstanceSpec,
    InstanceState,
    Priority,
    RequestLoad,
    RequestPhase,
    Role,
    WorkerLoad,
)

log = logging.getLogger("ferry.scheduler.persistence")
HASH_KEY = "ferry:instances"
FORMAT_VERSION = 2
TIMEOUT_S = 2.0


def encode(state: InstanceState) -> str:
    spec = dataclasses.asdict(state.spec) | {"role": state.spec.role.value}
    load = dataclasses.asdict(state.load) | {"requests": [
        dataclasses.asdict(r) | {"phase": r.phase.value, "priority": r.priority.value} for r in state.load.requests]}
    return json.dumps({"v": FORMAT_VERSION, "spec": spec, "load": load,
                       "last_heartbeat": state.last_heartbeat}, sort_keys=True)


def decode(raw: str | bytes) -> InstanceState:
    """One stored entry; raises ValueError when it is not one this version wrote."""
    try:
        data: dict[str, Any] = json.loads(raw)
        if data.get("v") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('v')!r}, expected {FORMAT_VERSION}")
        spec = InstanceSpec(**(data["spec"] | {"role": Role(data["spec"]["role"])}))
        requests = tuple(RequestLoad(**(r | {"phase": RequestPhase(r["phase"]), "priority": Priority(r["priority"])}))
                         for r in data["load"]["requests"])
        load = WorkerLoad(**(data["load"] | {"requests": requests}))
        return InstanceState(spec, load, float(data["last_heartbeat"]))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable instance entry: {e}") from None


class RedisPersistence:
    def __init__(self, url: str, flush_interval_s: float = 1.0) -> None:
        self.url = url
        self.flush_interval_s = flush_interval_s
        self._redis = aioredis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._dirty: dict[str, InstanceState | None] = {}   # None = delete
        self._lock = asyncio.Lock()   # one flush at a time, so writes of one id land in order

    async def load(self) -> list[InstanceState]:
        """Every stored instance (unreadable entries are logged and skipped). Raises OSError when
        Redis cannot be reached: a scheduler told to persist should not start without its store."""
        try:
            entries = await self._redis.hgetall(HASH_KEY)
        except (RedisError, OSError) as e:
            raise OSError(f"cannot read {HASH_KEY} from Redis at {self.url}: {e}") from None
        states = []
        for instance_id, raw in sorted(entries.items()):
            try:
                states.append(decode(raw))
            except ValueError as e:
                log.warning("skipping Redis entry %s: %s", instance_id, e)
        return states

    async def save_now(self, state: InstanceState) -> None:
        self._dirty[state.instance_id] = state
        await self.flush()

    async def delete_now(self, instance_id: str) -> None:
        self._dirty[instance_id] = None
        await self.flush()

    def mark(self, state: InstanceState) -> None:
        """Write this state at the next flush (heartbeats)."""
        self._dirty[state.instance_id] = state

    async def flush(self) -> None:
        """Write every pending change in one round trip; on error keep them pending for the next."""
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        if not self._dirty:
            return
        pending, self._dirty = self._dirty, {}
        pipe = self._redis.pipeline(transaction=False)
        for instance_id, state in pending.items():
            if state is None:
                pipe.hdel(HASH_KEY, instance_id)
            else:
                pipe.hset(HASH_KEY, instance_id, encode(state))
        try:
            await pipe.execute()
        except (RedisError, OSError) as e:
            log.warning("Redis write of %d instance(s) failed, will retry: %s", len(pending), e)
            self._dirty = pending | self._dirty     # newer changes made meanwhile win

    async def run_flusher(self, stop: asyncio.Event) -> None:
        """Flush every `flush_interval_s` until `stop` is set, then once more."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            await self.flush()

    async def close(self) -> None:
        await self._redis.aclose()
