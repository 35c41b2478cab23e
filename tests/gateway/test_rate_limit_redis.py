"""Rate limits shared by gateway replicas through a real redis-server: one bucket across replicas, on
Redis's clock, gone from Redis once full again, and each replica limiting alone while Redis is down."""
from __future__ import annotations

import httpx
import pytest
import redis
import yaml

from services.gateway.api_keys import KeysFile, hash_key
from services.gateway.app import Gateway, create_app
from services.gateway.auth import Access
from services.gateway.metrics import GatewayMetrics
from services.gateway.rate_limit_redis import PREFIX, RedisBuckets
from services.gateway.token_sink import TokenSink
from tests.gateway.test_auth import NoWorkers, bearer, completion
from tests.procs import free_port, start_redis, stop

KEY = "fk-shared-key-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_port(tmp_path):
    port = free_port()
    proc = start_redis(port, tmp_path)
    yield port
    stop(proc)


def url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


async def test_replicas_share_one_bucket(redis_port):
    a, b = RedisBuckets(url(redis_port)), RedisBuckets(url(redis_port))
    try:
        taken = [await r.take(("team", "requests"), 3, 1) for r in (a, b, a)]
        assert [d.is_allowed for d in taken] == [True, True, True]
        assert [d.remaining for d in taken] == [2, 1, 0]
        refused = await b.take(("team", "requests"), 3, 1)
        assert not refused.is_allowed and 19 < refused.retry_after_s <= 20     # 3 per minute: one per 20 s
        other = await b.take(("other", "requests"), 3, 1)                      # buckets are per key ...
        tokens = await b.take(("team", "tokens"), 100, 40)                     # ... and per kind
        assert other.is_allowed and tokens.is_allowed and tokens.remaining == 60
        never = await a.take(("team", "tokens"), 100, 101)
        assert not never.is_allowed and never.retry_after_s is None            # more than a whole minute
    finally:
        await a.close()
        await b.close()


async def test_a_bucket_expires_from_redis_once_it_would_be_full(redis_port):
    buckets = RedisBuckets(url(redis_port))
    store = redis.Redis.from_url(url(redis_port))
    try:
        await buckets.take(("team", "requests"), 60, 1)             # 60 per minute: full again in 1 s
        ttl_ms = store.pttl(f"{PREFIX}team:requests")
        assert 1000 < ttl_ms <= 2000                                # time to full + 1 s of slack
        await buckets.take(("team", "tokens"), 60, 30)              # 30 s to full
        assert 30_000 < store.pttl(f"{PREFIX}team:tokens") <= 31_000
    finally:
        await buckets.close()
        store.close()


async def test_each_replica_limits_alone_while_redis_is_down_then_shares_again(tmp_path):
    port, clock, shared = free_port(), Clock(), []
    buckets = RedisBuckets(url(port), retry_after_s=5.0, on_shared=shared.append, clock=clock)
    try:
        first = await buckets.take(("team", "requests"), 2, 1)          # nothing listens: local bucket
        assert first.is_allowed and first.remaining == 1 and shared == [False]
        assert (await buckets.take(("team", "requests"), 2, 1)).is_allowed
        assert not (await buckets.take(("team", "requests"), 2, 1)).is_allowed   # the local limit holds
        proc = start_redis(port, tmp_path)
        try:
            clock.now += 1                                              # within retry_after_s: Redis left alone
            await buckets.take(("x", "requests"), 2, 1)
            assert shared[-1] is False
            clock.now += 5
            d = await buckets.take(("team", "requests"), 2, 1)          # Redis again: its own, full bucket
            assert d.is_allowed and d.remaining == 1 and shared[-1] is True
        finally:
            stop(proc)
    finally:
        await buckets.close()


def gateway(tokenizer, keys_file, buckets) -> httpx.AsyncClient:
    metrics = GatewayMetrics()
    gw = Gateway(tokenizer=tokenizer, sink=TokenSink(), sink_address="127.0.0.1:1", scheduler=NoWorkers(),
                 channels=lambda address: None, metrics=metrics)
    buckets.on_shared = metrics.rate_limit_shared.set
    gw.access = Access(KeysFile(keys_file), metrics, buckets=buckets)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw")


async def test_two_gateways_count_a_key_once(redis_port, tmp_path, smollm2_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"name": "team", "sha256": hash_key(KEY), "requests_per_minute": 2}]))
    one, two = RedisBuckets(url(redis_port)), RedisBuckets(url(redis_port))
    a, b = gateway(tokenizer, keys_file, one), gateway(tokenizer, keys_file, two)
    try:
        async with a, b:
            statuses = [(await c.post("/v1/completions", json=completion(), headers=bearer(KEY))).status_code
                        for c in (a, b, a)]
            metrics_text = (await a.get("/metrics")).text
    finally:
        await one.close()
        await two.close()
    assert statuses == [503, 503, 429]          # two admitted (no worker in this test), the third refused
    assert "ferry_gateway_rate_limit_shared 1.0" in metrics_text
