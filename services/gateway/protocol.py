"""OpenAI API requests → a validated `GenerationRequest`, and the response bodies (pure functions).

Validation errors are `InvalidRequest(message, param)`; the app turns them into HTTP 400 with an
OpenAI-style body: {"error": {"message", "type": "invalid_request_error", "param", "code"}}.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from services.common.cluster import Priority


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One request as the gateway runs it, whichever endpoint it came from."""
    kind: str                                  # "completion" | "chat"
    model: str
    prompt: str | list[int] | None = None      # completions
    messages: tuple[dict, ...] = ()            # chat
    max_tokens: int | None = None              # None: up to the context (chat default)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    user: str | None = None
    priority: Priority = Priority.NORMAL
    extra: dict[str, Any] = field(default_factory=dict)


UNSUPPORTED = {"logprobs": "logprobs", "top_logprobs": "logprobs", "echo": "echo", "suffix": "suffix",
               "tools": "tool calling", "functions": "function calling", "best_of": "best_of > 1"}


MAX_TOP_K = 2**31 - 1        # more than any vocabulary: the same as 0 (all tokens); fits the wire's uint32


def decode_body(raw: bytes) -> Any:
    """The request body's JSON document, or InvalidRequest for one the gateway cannot use: not JSON or
    not UTF-8, nested deeper than Python's recursion limit, an integer literal of more than 4300
    digits, or a string with an unpaired UTF-16 surrogate escape ("\\ud800": valid JSON, but not text
    that the tokenizer, protobuf or a JSON reply can carry)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("the body is not valid JSON for this server: it is nested too deeply") from None
    except ValueError as e:                     # int literal over sys.get_int_max_str_digits()
        raise InvalidRequest(f"the body is not valid JSON for this server: {e}") from None
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequest("the body has a string with an unpaired UTF-16 surrogate escape (such as "
                             "\\ud800): send valid Unicode text") from None
    except RecursionError:
        raise InvalidRequest("the body is not valid JSON for this server: it is nested too deeply") from None
    return body


def check_prompt_size(req: GenerationRequest, tokenizer: Any, max_model_len: int) -> None:
    """Refuse a text prompt that cannot fit the context before tokenizing it: no token covers more
    characters than the tokenizer's longest token (bytes, for byte-level BPE), so a longer text has more
    tokens than the context holds. A 10 MB prompt would otherwise hold the event loop for seconds."""
    texts = [req.prompt] if isinstance(req.prompt, str) else [m["content"] for m in req.messages]
    num_chars = sum(len(t) for t in texts)
    limit = max_model_len * _max_token_chars(tokenizer)
    if num_chars > limit:
        raise InvalidRequest(f"the prompt is {num_chars} characters, more than fit this model's context of "
                             f"{max_model_len} tokens (at most {limit} characters): shorten the prompt",
                             "messages" if req.kind == "chat" else "prompt")


@functools.lru_cache(maxsize=8)
def _max_token_chars(tokenizer: Any) -> int:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(len(t) for t in tokens if t)


def parse_request(kind: str, body: Any) -> GenerationRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = _typed(body, "model", str, required=True)
    for key, what in UNSUPPORTED.items():
        value = body.get(key)
        if (value not in (None, 1)) if key == "best_of" else bool(value):
            raise InvalidRequest(f"{what} is not supported by this server; remove `{key}`", key)
    n = _typed(body, "n", int)
    if n not in (None, 1):
        raise InvalidRequest("only n=1 is supported; send n separate requests", "n")
    max_tokens = _typed(body, "max_completion_tokens", int) if kind == "chat" else None
    max_tokens = _typed(body, "max_tokens", int) if max_tokens is None else max_tokens
    if max_tokens is None and kind == "completion":
        max_tokens = 16                         # OpenAI's default for completions
    if max_tokens is not None and max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise InvalidRequest(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = _typed(body, "top_k", int) or 0
    if top_k < 0 and top_k != -1:
        raise InvalidRequest(f"top_k must be >= 1 (or -1/0 for all tokens), got {top_k}", "top_k")
    stream = _typed(body, "stream", bool) or False
    options = _typed(body, "stream_options", dict) or {}
    if options and not stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequest("stream_options.include_usage must be a boolean", "stream_options")
    common = {"kind": kind, "model": model, "max_tokens": max_tokens, "temperature": temperature,
              "top_p": top_p, "top_k": min(max(top_k, 0), MAX_TOP_K), "seed": _typed(body, "seed", int),
              "stop": _stop(body.get("stop")), "stream": stream, "include_usage": include_usage,
              "ignore_eos": _typed(body, "ignore_eos", bool) or False, "user": _typed(body, "user", str),
              "priority": _priority(body.get("priority"))}
    if kind == "chat":
        return GenerationRequest(messages=_messages(body.get("messages")), **common)
    return GenerationRequest(prompt=_prompt(body.get("prompt")), **common)


def _typed(body: dict, key: str, tp: type, required: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise InvalidRequest(f"`{key}` is required", key)
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise InvalidRequest(f"`{key}` must be {_type_name(tp)}, got {type(value).__name__}", key)
    return value


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"`{key}` must be a number, got {type(value).__name__}", key)
    try:
        return float(value)
    except OverflowError:                       # an int beyond a double's range
        raise InvalidRequest(f"`{key}` is out of range: send a number such as 0.7", key) from None


def _type_name(tp: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", list: "an array"}[tp]


PRIORITY_NAMES = {p.value: p for p in Priority}


def _priority(value: Any) -> Priority:
    """A priority class by name ("high", "normal", "low") or, as vLLM takes it, an integer: below 0 is
    high, 0 normal, above 0 low (vLLM schedules lower values first)."""
    if value is None:
        return Priority.NORMAL
    if isinstance(value, str) and value in PRIORITY_NAMES:
        return PRIORITY_NAMES[value]
    if isinstance(value, int) and not isinstance(value, bool):
        return Priority.HIGH if value < 0 else Priority.NORMAL if value == 0 else Priority.LOW
    raise InvalidRequest(f"`priority` must be one of \"high\", \"normal\", \"low\" or an integer "
                         f"(< 0 high, 0 normal, > 0 low), got {value!r}", "priority")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > 4:
        raise InvalidRequest("`stop` must be a non-empty string or an array of up to 4 non-empty strings", "stop")
    return tuple(items)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]                       # a batch of one
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("`prompt` is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and len(value) > 1:
        raise InvalidRequest("batched prompts are not supported; send one prompt per request", "prompt")
    raise InvalidRequest("`prompt` is required: a non-empty string or an array of token ids", "prompt")


def _messages(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("`messages` is required: a non-empty array of {role, content}", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise InvalidRequest(f"messages[{i}] needs a role of system, user, assistant or tool", "messages")
        content = m.get("content")
        if isinstance(content, list):          # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return tuple(out)


# ---- responses ------------------------------------------------------------------------------
def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def choice(kind: str, text: str, finish_reason: str | None, delta: bool, first: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if delta:
        message = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def envelope(kind: str, request_id: str, model: str, created: int | None = None, chunk: bool = False) -> dict:
    obj = "text_completion" if kind == "completion" else ("chat.completion.chunk" if chunk else "chat.completion")
    return {"id": request_id, "object": obj, "created": created or int(time.time()), "model": model}
