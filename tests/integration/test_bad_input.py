"""Bad requests get a 4xx with an OpenAI-style error body that says what to fix: never a 500, never a hang."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.integration.stack import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CMPL, CHAT = "completions", "chat/completions"
OK_CMPL = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def cmpl(**changes) -> dict:
    return {k: v for k, v in {**OK_CMPL, **changes}.items() if v is not ...}


def chat(**changes) -> dict:
    return {k: v for k, v in {**OK_CHAT, **changes}.items() if v is not ...}


# (id, endpoint, body (bytes: sent as is), status, param, word the message must contain)
CASES = [
    ("invalid-json", CMPL, b'{"model": ', 400, None, "json"),
    ("not-utf8", CMPL, b'\xff\xfe{"model"}', 400, None, "json"),
    ("body-array", CMPL, b"[1, 2]", 400, None, "object"),
    ("body-string", CHAT, b'"hello"', 400, None, "object"),
    ("body-null", CHAT, b"null", 400, None, "object"),
    ("missing-model", CMPL, cmpl(model=...), 400, "model", "required"),
    ("model-not-string", CHAT, chat(model=5), 400, "model", "string"),
    ("missing-prompt", CMPL, cmpl(prompt=...), 400, "prompt", "required"),
    ("empty-prompt", CMPL, cmpl(prompt=""), 400, "prompt", "empty"),
    ("prompt-not-text", CMPL, cmpl(prompt={"text": "hi"}), 400, "prompt", "prompt"),
    ("batched-prompts", CMPL, cmpl(prompt=["a", "b"]), 400, "prompt", "one prompt"),
    ("missing-messages", CHAT, chat(messages=...), 400, "messages", "required"),
    ("messages-not-list", CHAT, chat(messages="hi"), 400, "messages", "array"),
    ("messages-empty", CHAT, chat(messages=[]), 400, "messages", "non-empty"),
    ("message-bad-role", CHAT, chat(messages=[{"role": "bot", "content": "x"}]), 400, "messages", "role"),
    ("message-no-content", CHAT, chat(messages=[{"role": "user"}]), 400, "messages", "content"),
    ("max-tokens-string", CMPL, cmpl(max_tokens="ten"), 400, "max_tokens", "integer"),
    ("max-tokens-float", CHAT, chat(max_tokens=2.5), 400, "max_tokens", "integer"),
    ("max-tokens-zero", CMPL, cmpl(max_tokens=0), 400, "max_tokens", "at least 1"),
    ("max-tokens-negative", CHAT, chat(max_tokens=-1), 400, "max_tokens", "at least 1"),
    ("max-tokens-beyond-context", CMPL, cmpl(max_tokens=9000), 400, "max_tokens", "lower max_tokens"),
    ("max-tokens-huge", CHAT, chat(max_tokens=10**30), 400, "max_tokens", "lower max_tokens"),
    ("temperature-string", CMPL, cmpl(temperature="hot"), 400, "temperature", "number"),
    ("temperature-range", CHAT, chat(temperature=3), 400, "temperature", "between 0 and 2"),
    ("top-p-zero", CMPL, cmpl(top_p=0), 400, "top_p", "top_p"),
    ("top-k-negative", CMPL, cmpl(top_k=-5), 400, "top_k", "top_k"),
    ("stream-int", CMPL, cmpl(stream=1), 400, "stream", "boolean"),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400,
     "stream_options", "stream"),
    ("stop-int", CMPL, cmpl(stop=5), 400, "stop", "stop"),
    ("stop-too-many", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "up to 4"),
    ("seed-string", CMPL, cmpl(seed="x"), 400, "seed", "integer"),
    ("unknown-model", CMPL, cmpl(model="gpt-5"), 404, "model", "does not exist"),
    ("unknown-model-chat", CHAT, chat(model="gpt-5"), 404, "model", MODEL),
    ("prompt-beyond-context", CMPL, cmpl(prompt=[100] * 8300, max_tokens=1), 400, "prompt", "shorten"),
    ("prompt-fills-context", CMPL, cmpl(prompt=[100] * 8192, max_tokens=1), 400, "prompt", "shorten"),
    ("token-id-beyond-vocab", CMPL, cmpl(prompt=[1, 2, 49152]), 400, "prompt", "token ids"),
    ("token-id-negative", CMPL, cmpl(prompt=[-1]), 400, "prompt", "token ids"),
    ("n-2", CMPL, cmpl(n=2), 400, "n", "n=1"),
    ("n-2-chat", CHAT, chat(n=2), 400, "n", "n=1"),
    ("logprobs", CMPL, cmpl(logprobs=1), 400, "logprobs", "remove"),
    ("logprobs-chat", CHAT, chat(logprobs=True), 400, "logprobs", "remove"),
    ("best-of", CMPL, cmpl(best_of=3), 400, "best_of", "remove"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "remove"),
]


@pytest.fixture(scope="module")
def http(disagg_stack):
    with httpx.Client(base_url=f"{disagg_stack.url}/v1", timeout=20) as client:
        yield client


@pytest.mark.parametrize("endpoint,body,status,param,word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clear_4xx(http, endpoint, body, status, param, word):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(f"/{endpoint}", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert word.lower() in error["message"].lower(), error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_bad_requests_are_counted_and_the_gateway_still_serves(http, disagg_stack):
    r = http.post("/completions", json=cmpl(max_tokens=0))
    assert r.status_code == 400
    assert disagg_stack.metric("ferry_gateway_requests_total") >= 1
    assert 'status="400"' in disagg_stack.metrics()
    assert http.post("/completions", json=OK_CMPL).status_code == 200
    assert http.post("/chat/completions", json=OK_CHAT).status_code == 200
    odd_but_valid = [cmpl(top_k=2**40), cmpl(top_k=-1, seed=-5), cmpl(seed=2**70, temperature=0.5),
                     cmpl(prompt=["Hello"]), cmpl(prompt=[[1, 2, 3]]), chat(max_tokens=None, max_completion_tokens=2),
                     chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "Hi"}]}])]
    for body in odd_but_valid:
        r = http.post("/chat/completions" if "messages" in body else "/completions", json=body)
        assert r.status_code == 200, (body, r.text)


def test_unknown_paths_and_methods_are_json_errors(http):
    r = http.get("/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = http.post("/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 404 and "error" in r.json()
