"""`parse_request` (pure): what it accepts, what it refuses and which parameter it names; response bodies."""
from __future__ import annotations

import pytest

from services.gateway.protocol import InvalidRequest, choice, envelope, error_body, parse_request, usage

M = "m"
MSGS = [{"role": "user", "content": "hi"}]


def cmpl(**kw) -> dict:
    return {k: v for k, v in {"model": M, "prompt": "hi", **kw}.items() if v is not ...}


def chat(**kw) -> dict:
    return {k: v for k, v in {"model": M, "messages": MSGS, **kw}.items() if v is not ...}


# (id, kind, body, {field: expected value} on the parsed request)
ACCEPT = [
    ("completion-defaults", "completion", cmpl(),
     {"prompt": "hi", "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": (),
      "stream": False, "include_usage": False, "ignore_eos": False}),
    ("chat-defaults", "chat", chat(), {"messages": ({"role": "user", "content": "hi"},), "max_tokens": None}),
    ("token-ids", "completion", cmpl(prompt=[1, 2, 3]), {"prompt": [1, 2, 3]}),
    ("batch-of-one-string", "completion", cmpl(prompt=["hi"]), {"prompt": "hi"}),
    ("batch-of-one-ids", "completion", cmpl(prompt=[[5, 6]]), {"prompt": [5, 6]}),
    ("max-tokens", "completion", cmpl(max_tokens=7), {"max_tokens": 7}),
    ("max-completion-tokens", "chat", chat(max_completion_tokens=9, max_tokens=3), {"max_tokens": 9}),
    ("chat-max-tokens", "chat", chat(max_tokens=3), {"max_tokens": 3}),
    ("greedy", "completion", cmpl(temperature=0), {"temperature": 0.0}),
    ("int-temperature", "chat", chat(temperature=2), {"temperature": 2.0}),
    ("top-p-top-k", "completion", cmpl(top_p=0.5, top_k=40), {"top_p": 0.5, "top_k": 40}),
    ("top-k-minus-one", "completion", cmpl(top_k=-1), {"top_k": 0}),
    ("top-k-huge", "completion", cmpl(top_k=2**40), {"top_k": 2**31 - 1}),
    ("seed", "completion", cmpl(seed=-3), {"seed": -3}),
    ("stop-string", "completion", cmpl(stop="\n"), {"stop": ("\n",)}),
    ("stop-list", "chat", chat(stop=["a", "bc"]), {"stop": ("a", "bc")}),
    ("stream-usage", "chat", chat(stream=True, stream_options={"include_usage": True}),
     {"stream": True, "include_usage": True}),
    ("ignore-eos", "completion", cmpl(ignore_eos=True), {"ignore_eos": True}),
    ("nulls-are-defaults", "completion", cmpl(max_tokens=None, temperature=None, stop=None, n=None, seed=None),
     {"max_tokens": 16, "temperature": 1.0, "stop": ()}),
    ("n-1-best-of-1", "completion", cmpl(n=1, best_of=1, logprobs=0, echo=False), {}),
    ("developer-role", "chat", chat(messages=[{"role": "developer", "content": "be brief"}]),
     {"messages": ({"role": "system", "content": "be brief"},)}),
    ("content-parts", "chat",
     chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
     {"messages": ({"role": "user", "content": "ab"},)}),
    ("unknown-fields-ignored", "chat", chat(presence_penalty=0, user="u", metadata={"x": 1}), {"user": "u"}),
]


@pytest.mark.parametrize("kind,body,expected", [c[1:] for c in ACCEPT], ids=[c[0] for c in ACCEPT])
def test_accepts(kind, body, expected):
    req = parse_request(kind, body)
    assert req.kind == kind and req.model == M
    for key, value in expected.items():
        assert getattr(req, key) == value, key


# (id, kind, body, param named, word in the message)
REJECT = [
    ("body-list", "completion", [], None, "JSON object"),
    ("body-none", "chat", None, None, "JSON object"),
    ("body-string", "chat", "hi", None, "JSON object"),
    ("no-model", "completion", cmpl(model=...), "model", "required"),
    ("model-int", "chat", chat(model=3), "model", "string"),
    ("no-prompt", "completion", cmpl(prompt=...), "prompt", "required"),
    ("empty-prompt", "completion", cmpl(prompt=""), "prompt", "empty"),
    ("empty-ids", "completion", cmpl(prompt=[]), "prompt", "required"),
    ("mixed-ids", "completion", cmpl(prompt=[1, "a"]), "prompt", "prompt"),
    ("bool-ids", "completion", cmpl(prompt=[True, False]), "prompt", "prompt"),
    ("batch", "completion", cmpl(prompt=["a", "b"]), "prompt", "one prompt per request"),
    ("prompt-dict", "completion", cmpl(prompt={"a": 1}), "prompt", "prompt"),
    ("no-messages", "chat", chat(messages=...), "messages", "required"),
    ("messages-string", "chat", chat(messages="hi"), "messages", "array"),
    ("messages-empty", "chat", chat(messages=[]), "messages", "non-empty"),
    ("message-not-object", "chat", chat(messages=["hi"]), "messages", "role"),
    ("message-bad-role", "chat", chat(messages=[{"role": "robot", "content": "x"}]), "messages", "role"),
    ("message-no-content", "chat", chat(messages=[{"role": "user"}]), "messages", "content"),
    ("message-int-content", "chat", chat(messages=[{"role": "user", "content": 5}]), "messages", "string"),
    ("message-image-part", "chat",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages", "text parts"),
    ("max-tokens-str", "completion", cmpl(max_tokens="ten"), "max_tokens", "integer"),
    ("max-tokens-float", "completion", cmpl(max_tokens=1.5), "max_tokens", "integer"),
    ("max-tokens-bool", "completion", cmpl(max_tokens=True), "max_tokens", "integer"),
    ("max-tokens-zero", "completion", cmpl(max_tokens=0), "max_tokens", "at least 1"),
    ("max-tokens-negative", "chat", chat(max_tokens=-1), "max_tokens", "at least 1"),
    ("max-completion-tokens-zero", "chat", chat(max_completion_tokens=0), "max_tokens", "at least 1"),
    ("max-completion-tokens-str", "chat", chat(max_completion_tokens="x"), "max_completion_tokens", "integer"),
    ("temperature-str", "completion", cmpl(temperature="hot"), "temperature", "number"),
    ("temperature-bool", "completion", cmpl(temperature=True), "temperature", "number"),
    ("temperature-high", "chat", chat(temperature=2.5), "temperature", "between 0 and 2"),
    ("temperature-negative", "chat", chat(temperature=-0.1), "temperature", "between 0 and 2"),
    ("temperature-nan", "chat", chat(temperature=float("nan")), "temperature", "between 0 and 2"),
    ("top-p-zero", "completion", cmpl(top_p=0), "top_p", "(0, 1]"),
    ("top-p-high", "completion", cmpl(top_p=1.5), "top_p", "(0, 1]"),
    ("top-k-negative", "completion", cmpl(top_k=-2), "top_k", ">= 1"),
    ("top-k-float", "completion", cmpl(top_k=2.5), "top_k", "integer"),
    ("seed-str", "completion", cmpl(seed="1"), "seed", "integer"),
    ("stream-int", "completion", cmpl(stream=1), "stream", "boolean"),
    ("stream-str", "chat", chat(stream="true"), "stream", "boolean"),
    ("stream-options-no-stream", "chat", chat(stream_options={"include_usage": True}), "stream_options", "stream"),
    ("stream-options-list", "chat", chat(stream=True, stream_options=[1]), "stream_options", "object"),
    ("include-usage-str", "chat", chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options",
     "boolean"),
    ("stop-int", "completion", cmpl(stop=5), "stop", "stop"),
    ("stop-empty", "completion", cmpl(stop=""), "stop", "non-empty"),
    ("stop-list-int", "chat", chat(stop=["a", 1]), "stop", "stop"),
    ("stop-five", "chat", chat(stop=list("abcde")), "stop", "up to 4"),
    ("ignore-eos-int", "completion", cmpl(ignore_eos=1), "ignore_eos", "boolean"),
    ("user-int", "chat", chat(user=1), "user", "string"),
    ("n-2", "completion", cmpl(n=2), "n", "n=1"),
    ("n-0", "chat", chat(n=0), "n", "n=1"),
    ("n-str", "chat", chat(n="2"), "n", "integer"),
    ("logprobs-int", "completion", cmpl(logprobs=2), "logprobs", "remove `logprobs`"),
    ("logprobs-true", "chat", chat(logprobs=True), "logprobs", "not supported"),
    ("top-logprobs", "chat", chat(top_logprobs=3), "top_logprobs", "not supported"),
    ("echo", "completion", cmpl(echo=True), "echo", "remove `echo`"),
    ("suffix", "completion", cmpl(suffix="x"), "suffix", "not supported"),
    ("tools", "chat", chat(tools=[{"type": "function"}]), "tools", "tool calling"),
    ("functions", "chat", chat(functions=[{"name": "f"}]), "functions", "function calling"),
    ("best-of", "completion", cmpl(best_of=2), "best_of", "best_of"),
]


@pytest.mark.parametrize("kind,body,param,word", [c[1:] for c in REJECT], ids=[c[0] for c in REJECT])
def test_rejects_and_names_the_parameter(kind, body, param, word):
    with pytest.raises(InvalidRequest) as info:
        parse_request(kind, body)
    assert info.value.param == param
    assert info.value.status == 400
    assert word.lower() in str(info.value).lower(), str(info.value)


def test_response_bodies_have_the_openai_shape():
    assert error_body("bad", "max_tokens") == {"error": {"message": "bad", "type": "invalid_request_error",
                                                         "param": "max_tokens", "code": None}}
    assert usage(5, 3, 2) == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                              "prompt_tokens_details": {"cached_tokens": 2}}
    assert choice("completion", "x", "stop", delta=False) == {"index": 0, "text": "x", "logprobs": None,
                                                              "finish_reason": "stop"}
    assert choice("chat", "x", None, delta=True, first=True)["delta"] == {"role": "assistant", "content": "x"}
    assert choice("chat", "x", None, delta=True)["delta"] == {"content": "x"}
    assert choice("chat", "x", "length", delta=False)["message"] == {"role": "assistant", "content": "x"}
    assert envelope("completion", "id", M, 5) == {"id": "id", "object": "text_completion", "created": 5, "model": M}
    assert envelope("chat", "id", M, 5, chunk=True)["object"] == "chat.completion.chunk"
    assert envelope("chat", "id", M)["object"] == "chat.completion"
