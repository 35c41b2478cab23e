"""A client that goes away aborts its request on the workers: every KV block returns to the pool."""
from __future__ import annotations

import itertools

import httpx
import pytest

from tests.integration.stack import MODEL, Stack
from tests.procs import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DISCONNECTS = "ferry_gateway_client_disconnects_total"
LONG = {"model": MODEL, "max_tokens": 2000, "ignore_eos": True, "temperature": 0}     # minutes on CPU


def running(stack: Stack) -> int:
    return sum(s.load.num_running + s.load.num_waiting for s in stack.worker_stats())


def assert_released(stack: Stack, disconnects_before: float) -> None:
    assert eventually(stack.idle, timeout=20, interval=0.2), \
        f"blocks still held after the client left: {[str(s.load) for s in stack.worker_stats()]}"
    assert eventually(lambda: stack.metric(DISCONNECTS) == disconnects_before + 1, timeout=10), \
        stack.metric(DISCONNECTS)


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_streaming_client_that_closes_the_connection_frees_the_blocks(disagg_stack, endpoint):
    stack = disagg_stack
    assert eventually(stack.idle, timeout=20), "the stack is busy before the test"
    before = stack.metric(DISCONNECTS)
    body = {**LONG, "stream": True}
    if endpoint == "completions":
        body["prompt"] = "Tell me a very long story about a ferry that crosses a wide river."
    else:
        body["messages"] = [{"role": "user", "content": "Tell me a very long story about a ferry."}]
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{stack.url}/v1/{endpoint}", json=body) as r:
        assert r.status_code == 200
        events = itertools.islice((line for line in r.iter_lines() if line.startswith("data: ")), 3)
        assert len(list(events)) == 3
        assert running(stack) >= 1, "the request runs on a worker while the client reads"
    # leaving the `with` closed the connection mid-stream
    assert_released(stack, before)
    check = httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                       timeout=30)
    assert check.status_code == 200, check.text


def test_non_streaming_client_that_times_out_frees_the_blocks(disagg_stack):
    stack = disagg_stack
    assert eventually(stack.idle, timeout=20), "the stack is busy before the test"
    before = stack.metric(DISCONNECTS)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url}/v1/completions", json={**LONG, "prompt": "Once upon a time"},
                   timeout=httpx.Timeout(30, read=3))
    assert_released(stack, before)


def test_streaming_client_that_leaves_during_the_prefill_frees_the_blocks(disagg_stack):
    """The client gives up before the first token (a long prompt): the stream never sends a byte."""
    stack = disagg_stack
    assert eventually(stack.idle, timeout=20), "the stack is busy before the test"
    before = stack.metric(DISCONNECTS)
    body = {**LONG, "prompt": list(range(3000, 3600)), "stream": True}      # ~2 s of prefill on CPU
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(30, read=0.5)) as http, \
            http.stream("POST", f"{stack.url}/v1/completions", json=body) as r:
        for _ in r.iter_lines():
            pass
    assert_released(stack, before)
