"""Hostile HTTP input against a real gateway (in front of a sim stack): whatever the body, headers or
numbers, the answer is a 4xx with a JSON `error` that says what to fix, or a normal completion —
never a 5xx, never a hang. Hypothesis generates the bodies; each test is bounded in examples and time.
"""
from __future__ import annotations

import json
import math
import time

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.stack import MODEL

pytestmark = pytest.mark.integration

REPLY_TIMEOUT_S = 15.0          # a reply slower than this is a hang
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def http(sim_stack):
    with httpx.Client(base_url=f"{sim_stack.url}/v1", timeout=REPLY_TIMEOUT_S) as client:
        yield client


def check(r: httpx.Response, sent: object, in_hypothesis: bool = True) -> None:
    """< 500; a 4xx has an OpenAI error body with a message; a 200 is a completion."""
    if in_hypothesis:
        event(f"HTTP {r.status_code}")
    assert r.status_code < 500, (sent, r.status_code, r.text[:500])
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
    if r.status_code >= 400:
        assert body is not None, (sent, r.status_code, r.text[:500])
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"], (sent, body)
        assert error["type"] == "invalid_request_error", (sent, body)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), (sent, r.text[-500:])
        assert '"error"' not in r.text, (sent, r.text[-500:])
    else:
        assert r.status_code == 200 and body["choices"], (sent, r.text[:500])


def post(http: httpx.Client, path: str, raw: bytes, content_type: str = "application/json") -> httpx.Response:
    started = time.monotonic()
    try:
        r = http.post(path, content=raw, headers={"Content-Type": content_type})
    except httpx.TimeoutException:
        pytest.fail(f"no reply in {REPLY_TIMEOUT_S} s to {raw[:300]!r}")
    assert time.monotonic() - started < REPLY_TIMEOUT_S
    return r


# ---- strategies -----------------------------------------------------------------------------
# A request is drawn valid field by field, then up to three of its fields are swapped for hostile
# values: most examples fail one check deep in the parser (or none), not the first one.
weird_numbers = st.sampled_from([0, -1, 1, 2, -(2**63), 2**63, 2**64, 10**12, 10**30, 0.5, -0.0, 1e308,
                                 -1e308, math.inf, -math.inf, math.nan, 2**31, 4294967296, 10**400, -(10**400)])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | weird_numbers | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
text = st.text(max_size=40)
odd_text = st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "\U0010ffff", "<|im_end|>", "<|im_start|>user",
                            "{{ raise_exception('x') }}", "{% for %}", "\r\n" * 50]) | st.text(max_size=40)
valid_message = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
    "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1,
                               max_size=3)})
hostile_message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["bot", "", "USER", "function"]) | json_values,
    "content": odd_text | json_values | st.lists(st.fixed_dictionaries(
        {}, optional={"type": st.sampled_from(["text", "image_url"]) | json_values, "text": odd_text | json_values}),
        max_size=3)}) | json_values
token_ids = st.lists(st.integers(0, 49151), min_size=1, max_size=20)
VALID = {
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 100),
    "seed": st.integers(-(2**70), 2**70),
    "stop": text.filter(bool) | st.lists(text.filter(bool), min_size=1, max_size=4),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "user": text,
    "priority": st.sampled_from(["high", "normal", "low"]) | st.integers(),
    "n": st.just(1),
    "best_of": st.just(1),
    "unknown_field": json_values,
}
HOSTILE = {
    "model": odd_text | json_values,
    "max_tokens": weird_numbers | json_values,
    "max_completion_tokens": st.integers(1, 4) | weird_numbers | json_values,
    "temperature": weird_numbers | json_values,
    "top_p": weird_numbers | json_values,
    "top_k": weird_numbers | json_values,
    "seed": weird_numbers | json_values,
    "stop": odd_text | st.lists(odd_text, max_size=6) | json_values,
    "stream": json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values,
    "ignore_eos": json_values,
    "user": odd_text | json_values,
    "priority": st.sampled_from(["urgent", ""]) | weird_numbers | json_values,
    "n": weird_numbers | json_values,
    "logprobs": st.booleans() | json_values,
    "best_of": json_values,
    "echo": json_values,
    "tools": json_values,
}


@st.composite
def request_bodies(draw, kind: str) -> dict:
    fields = {"model": st.just(MODEL), **VALID}
    if kind == "completion":
        fields["prompt"] = text.filter(bool) | token_ids | st.lists(text.filter(bool), min_size=1, max_size=1)
        hostile = {**HOSTILE, "prompt": odd_text | st.lists(st.integers() | weird_numbers, max_size=20)
                   | st.lists(odd_text | token_ids, max_size=3) | json_values}
    else:
        fields["messages"] = st.lists(valid_message, min_size=1, max_size=4)
        hostile = {**HOSTILE, "messages": st.lists(valid_message | hostile_message, max_size=4) | json_values}
    required = ("model", "max_tokens", "prompt" if kind == "completion" else "messages")
    body = draw(st.fixed_dictionaries({k: fields[k] for k in required},
                                      optional={k: v for k, v in fields.items() if k not in required}))
    if body.get("stream"):
        body["stream_options"] = draw(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}))
    for key in draw(st.lists(st.sampled_from(sorted(hostile)), max_size=3, unique=True)):
        body[key] = draw(hostile[key])
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=1)):
        del body[key]                         # a missing field, now and then
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2                # a chat default runs to the context: keep examples fast
    return body


completions = request_bodies("completion")
chats = request_bodies("chat")


def dump(value: object) -> bytes:
    return json.dumps(value, allow_nan=True, ensure_ascii=True).encode()


@FUZZ
@given(request=completions)
def test_completions_fuzz(http, request):
    check(post(http, "/completions", dump(request)), request)


@FUZZ
@given(request=chats)
def test_chat_completions_fuzz(http, request):
    check(post(http, "/chat/completions", dump(request)), request)


@settings(FUZZ, max_examples=80)
@given(raw=st.binary(max_size=200) | json_values.map(dump) | completions.map(lambda b: dump(b)[:-3]),
       path=st.sampled_from(["/completions", "/chat/completions"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "", "application/json; charset=latin-1"]))
def test_any_bytes_any_content_type(http, raw, path, content_type):
    check(post(http, path, raw, content_type), raw)


# ---- hand-picked hostile bodies -------------------------------------------------------------
OK = {"model": MODEL, "max_tokens": 2}
NESTED = b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
CASES = [
    ("deeply-nested", "/completions", NESTED),
    ("deeply-nested-messages", "/chat/completions", b'{"messages": ' + b'[{"content": ' * 5000 + b"1" + b"}]" * 5000
     + b"}"),
    ("huge-int-literal", "/completions", b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}"),
    ("huge-int-temperature", "/completions", dump({**OK, "prompt": "hi", "temperature": 10**400})),
    ("huge-int-top-p", "/chat/completions", dump({**OK, "messages": [{"role": "user", "content": "x"}],
                                                   "top_p": -(10**400)})),
    ("nan-temperature", "/completions", b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL.encode()),
    ("infinity-top-p", "/completions", b'{"model": "%s", "prompt": "hi", "top_p": Infinity}' % MODEL.encode()),
    ("lone-surrogate-prompt", "/completions", dump({**OK, "prompt": "hi \ud800 there"})),
    ("lone-surrogate-content", "/chat/completions", dump({**OK, "messages": [{"role": "user", "content": "\udfff"}]})),
    ("lone-surrogate-stop", "/completions", dump({**OK, "prompt": "hi", "stop": ["\ud800"]})),
    ("lone-surrogate-model", "/completions", dump({**OK, "model": "\ud800", "prompt": "hi"})),
    ("lone-surrogate-key", "/completions", dump({**OK, "prompt": "hi", "\ud800": 1})),
    ("lone-surrogate-user", "/completions", dump({**OK, "prompt": "hi", "user": "\ud800"})),
    ("invalid-utf8-in-string", "/completions", b'{"model": "%s", "prompt": "\xc3\x28"}' % MODEL.encode()),
    ("utf16-body", "/completions", json.dumps({**OK, "prompt": "hi"}).encode("utf-16")),
    ("max-tokens-10e12", "/completions", dump({**OK, "prompt": "hi", "max_tokens": 10**12})),
    ("max-tokens-float-exp", "/completions", b'{"model": "%s", "prompt": "hi", "max_tokens": 1e12}' % MODEL.encode()),
    ("empty-body", "/completions", b""),
    ("whitespace-body", "/chat/completions", b"   \n"),
    ("two-documents", "/completions", dump({**OK, "prompt": "hi"}) * 2),
    ("empty-messages", "/chat/completions", dump({**OK, "messages": []})),
    ("empty-message", "/chat/completions", dump({**OK, "messages": [{}]})),
    ("unknown-role", "/chat/completions", dump({**OK, "messages": [{"role": "wizard", "content": "x"}]})),
    ("only-assistant", "/chat/completions", dump({**OK, "messages": [{"role": "assistant", "content": "x"}]})),
    ("only-tool", "/chat/completions", dump({**OK, "messages": [{"role": "tool", "content": "x"}]})),
    ("null-content", "/chat/completions", dump({**OK, "messages": [{"role": "user", "content": None}]})),
    ("huge-token-id", "/completions", dump({**OK, "prompt": [2**64]})),
    ("negative-priority", "/completions", dump({**OK, "prompt": "hi", "priority": -(10**30)})),
    ("seed-huge-negative", "/completions", dump({**OK, "prompt": "hi", "seed": -(10**40)})),
    ("top-k-huge-negative", "/completions", dump({**OK, "prompt": "hi", "top_k": -(10**40)})),
    ("stop-10-mb", "/completions", dump({**OK, "prompt": "hi", "stop": "x" * 10_000_000})),
]


@pytest.mark.parametrize("path,raw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_body_gets_4xx_or_a_completion(http, path, raw):
    check(post(http, path, raw), raw[:200], in_hypothesis=False)


def test_ten_megabyte_prompt_is_refused_quickly(http):
    """The context is 8k tokens: a 10 MB prompt is refused with what to do about it, within seconds."""
    started = time.monotonic()
    r = post(http, "/completions", dump({**OK, "prompt": "word " * 2_000_000}))
    assert r.status_code in (400, 413), r.text[:300]
    assert "prompt" in r.json()["error"]["message"].lower()
    assert time.monotonic() - started < 10


def test_still_serves_after_the_fuzzing(http):
    r = http.post("/completions", json={**OK, "prompt": "Hello"})
    assert r.status_code == 200, r.text
    r = http.post("/chat/completions", json={**OK, "messages": [{"role": "user", "content": "Hello"}]})
    assert r.status_code == 200, r.text
