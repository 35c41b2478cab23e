"""A request body over the gateway's limit (--max-body-mb) gets a 413 with an OpenAI-style error body that
names the limit, before the body is read whole; one under it is parsed as usual."""
from __future__ import annotations

import httpx
import pytest

from services.gateway.app import Gateway, create_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.token_sink import TokenSink
from tests.gateway.test_auth import MODEL, NoWorkers


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_path)


def client(tokenizer, limit: int | None) -> httpx.AsyncClient:
    gw = Gateway(tokenizer=tokenizer, sink=TokenSink(), sink_address="127.0.0.1:1", scheduler=NoWorkers(),
                 channels=lambda address: None, metrics=GatewayMetrics(), max_body_bytes=limit)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gateway")


async def test_a_body_over_the_limit_is_refused_with_413(tokenizer):
    async with client(tokenizer, 1024) as c:
        big = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 4096, "max_tokens": 1})
        assert big.status_code == 413
        assert big.json()["error"]["message"] and big.json()["error"]["type"] == "invalid_request_error"
        small = await c.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 1})
        assert small.status_code == 503                  # parsed and planned; this test has no worker


async def test_the_default_gateway_has_no_limit_unless_configured(tokenizer):
    async with client(tokenizer, None) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "Hello " * 3000, "max_tokens": 1})
        assert r.status_code != 413


async def test_a_chunked_body_is_counted_as_it_streams_in(tokenizer):
    async def chunks():
        for _ in range(8):
            yield b" " * 512                          # no Content-Length: sent chunked

    async with client(tokenizer, 1024) as c:
        r = await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit of 1024 bytes" in r.json()["error"]["message"]
