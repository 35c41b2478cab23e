"""Many clients at once: 32 concurrent streams through the disaggregated stack all finish in full."""
from __future__ import annotations

import asyncio

import openai
import pytest

from tests.integration.stack import MODEL
from tests.procs import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM_REQUESTS = 32
MAX_TOKENS = 12


async def one_stream(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int, int]:
    """(text, finish_reason, content chunks, usage.completion_tokens) of one streamed request."""
    kind = "chat" if i % 2 else "completion"
    args = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0 if i % 4 < 2 else 0.8, "seed": i,
            "stream": True, "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}
    if kind == "chat":
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": f"Tell me a fact about the number {i}."}], **args)
    else:
        stream = await client.completions.create(prompt=f"Request {i}: the number {i} is", **args)
    parts, finish, chunks, usage = [], None, 0, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            chunks += 1
            parts.append(ch.text if kind == "completion" else (ch.delta.content or ""))
            finish = ch.finish_reason or finish
    return "".join(parts), finish, chunks, usage.completion_tokens if usage else -1


async def test_32_concurrent_streams_complete_with_every_token(disagg_stack):
    client = openai.AsyncOpenAI(base_url=disagg_stack.base_url, api_key="x", timeout=180, max_retries=0)
    try:
        results = await asyncio.gather(*(one_stream(client, i) for i in range(NUM_REQUESTS)))
    finally:
        await client.close()
    for i, (text, finish, chunks, completion_tokens) in enumerate(results):
        assert completion_tokens == MAX_TOKENS, (i, text)
        assert finish == "length", (i, text)
        assert text.strip() and 1 <= chunks <= MAX_TOKENS, (i, text, chunks)
    assert await asyncio.to_thread(eventually, disagg_stack.idle, 20), "every block returns to the pool"
