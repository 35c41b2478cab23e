"""Access control in the gateway app, in-process: 401 without a valid key, 429 over a key's limits, the
open endpoints, the rate-limit headers and metrics, and no key or prompt in any log line.

The app runs against a scheduler stand-in that knows one model and has no worker, so an admitted
generation request goes through parsing, tokenization and the token limit, then fails with 503.
"""
from __future__ import annotations

import logging

import httpx
import pytest
import yaml
from prometheus_client import generate_latest

from services.gateway.api_keys import KeysFile, hash_key
from services.gateway.app import Gateway, create_app
from services.gateway.auth import Access
from services.gateway.metrics import GatewayMetrics
from services.gateway.scheduler_client import ModelInfo, NoRoute
from services.gateway.token_sink import TokenSink

KEY, LIMITED_KEY, TOKENS_KEY = "fk-open-key-0123456789", "fk-limited-key-0123456789", "fk-tokens-key-0123456789"
MODEL = "m"


class NoWorkers:
    """The scheduler as the gateway sees it: one model listed, no worker to route to."""
    def __init__(self) -> None:
        self.models = {MODEL: ModelInfo(MODEL, 16, 2048)}
        self.instance_ids: dict[str, str] = {}

    async def route(self, request):
        raise NoRoute("no workers in this test")

    def instance_id_at(self, address: str) -> str:
        return ""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump([
        {"name": "open", "sha256": hash_key(KEY)},
        {"name": "limited", "sha256": hash_key(LIMITED_KEY), "requests_per_minute": 2},
        {"name": "tokens", "sha256": hash_key(TOKENS_KEY), "tokens_per_minute": 100}]))
    return path


def make_client(tokenizer, keys_file=None, clock=None) -> tuple[httpx.AsyncClient, GatewayMetrics]:
    metrics = GatewayMetrics()
    gw = Gateway(tokenizer=tokenizer, sink=TokenSink(), sink_address="127.0.0.1:1", scheduler=NoWorkers(),
                 channels=lambda address: None, metrics=metrics)
    if keys_file is not None:
        gw.access = Access(KeysFile(keys_file), metrics, clock or Clock())
    transport = httpx.ASGITransport(app=create_app(gw))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway"), metrics


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def completion(max_tokens: int = 4, prompt: str = "Hello") -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}


def rejected(metrics: GatewayMetrics) -> dict[tuple[str, str], float]:
    return {(s.labels["reason"], s.labels["key"]): s.value for s in metrics.rejected.collect()[0].samples
            if s.name.endswith("_total") and s.value}


async def test_without_a_keys_file_everything_is_open(tokenizer):
    client, metrics = make_client(tokenizer)
    async with client:
        assert (await client.get("/v1/models")).status_code == 200
        r = await client.post("/v1/completions", json=completion())
    assert r.status_code == 503                     # reached the (absent) workers
    assert "x-ratelimit-limit-requests" not in r.headers
    assert rejected(metrics) == {}


async def test_health_and_metrics_stay_open(tokenizer, keys_file):
    client, _ = make_client(tokenizer, keys_file)
    async with client:
        assert (await client.get("/health")).status_code == 200
        r = await client.get("/metrics")
    assert r.status_code == 200 and "ferry_gateway_requests_rejected_total" in r.text


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer "}, 401),
    ({"Authorization": f"Basic {KEY}"}, 401),
    ({"Authorization": KEY}, 401),
    (bearer("fk-not-a-key"), 401),
    (bearer(hash_key(KEY)), 401),                    # the hash at rest is not a key
    (bearer(KEY), 200),
    ({"authorization": f"bearer  {KEY} "}, 200),     # scheme case and spaces as HTTP allows
])
async def test_models_needs_a_valid_bearer_key(tokenizer, keys_file, headers, status):
    client, _ = make_client(tokenizer, keys_file)
    async with client:
        r = await client.get("/v1/models", headers=headers)
    assert r.status_code == status
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        assert KEY not in r.text and "fk-not-a-key" not in r.text
    else:
        assert r.json()["data"][0]["id"] == MODEL


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_generation_without_a_key_is_401_and_counted(tokenizer, keys_file, path):
    client, metrics = make_client(tokenizer, keys_file)
    async with client:
        r = await client.post(path, json=completion())
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert rejected(metrics) == {("unauthenticated", ""): 1.0}
    text = generate_latest(metrics.registry).decode()
    assert f'ferry_gateway_requests_total{{endpoint="{path}",status="401"}} 1.0' in text


async def test_requests_per_minute_then_429_with_retry_after_then_refilled(tokenizer, keys_file):
    clock = Clock()
    client, metrics = make_client(tokenizer, keys_file, clock)
    async with client:
        statuses, remaining = [], []
        for _ in range(2):
            r = await client.post("/v1/completions", json=completion(), headers=bearer(LIMITED_KEY))
            statuses.append(r.status_code)
            remaining.append(r.headers["x-ratelimit-remaining-requests"])
            assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert statuses == [503, 503] and remaining == ["1", "0"]       # admitted (then no worker)
        r = await client.post("/v1/completions", json=completion(), headers=bearer(LIMITED_KEY))
        assert r.status_code == 429
        assert r.headers["retry-after"] == "30"                         # 2 per minute: one every 30 s
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
        assert "limited" in error["message"]
        assert (await client.post("/v1/completions", json=completion(), headers=bearer(KEY))).status_code == 503
        clock.now += 30
        r = await client.post("/v1/completions", json=completion(), headers=bearer(LIMITED_KEY))
        assert r.status_code == 503
        assert (await client.get("/v1/models", headers=bearer(LIMITED_KEY))).status_code == 200   # not counted
    assert rejected(metrics) == {("rate_limited", "limited"): 1.0}


async def test_tokens_per_minute_count_prompt_and_max_tokens(tokenizer, keys_file):
    clock = Clock()
    client, metrics = make_client(tokenizer, keys_file, clock)
    async with client:
        r = await client.post("/v1/completions", json=completion(max_tokens=200), headers=bearer(TOKENS_KEY))
        assert r.status_code == 429 and "retry-after" not in r.headers        # can never fit: no retry
        assert "lower max_tokens" in r.json()["error"]["message"]
        r = await client.post("/v1/completions", json=completion(max_tokens=60), headers=bearer(TOKENS_KEY))
        assert r.status_code == 503
        assert r.headers["x-ratelimit-limit-tokens"] == "100"
        num_prompt = len(tokenizer.encode("Hello"))
        assert r.headers["x-ratelimit-remaining-tokens"] == str(100 - 60 - num_prompt)
        r = await client.post("/v1/completions", json=completion(max_tokens=60), headers=bearer(TOKENS_KEY))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert rejected(metrics) == {("rate_limited", "tokens"): 2.0}


async def test_no_key_prompt_or_header_in_any_log_line(tokenizer, keys_file, caplog):
    secret_prompt = "my bank password is hunter2-PROMPT-SECRET"
    caplog.set_level(logging.DEBUG)
    client, _ = make_client(tokenizer, keys_file)
    async with client:
        for headers in (bearer(KEY), bearer("fk-WRONG-SECRET-KEY"), {}):
            await client.post("/v1/completions", json=completion(prompt=secret_prompt), headers=headers)
            await client.post("/v1/chat/completions", headers=headers, json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": secret_prompt}]})
    text = caplog.text
    for secret in (KEY, "fk-WRONG-SECRET-KEY", "PROMPT-SECRET", "hunter2", "Bearer"):
        assert secret not in text
