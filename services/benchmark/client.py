"""One streaming request to an OpenAI-compatible endpoint, timed (send, each text chunk, end)."""

from __future__ import annotations

import json
import time

import httpx

from services.benchmark.metrics import RequestResult
from services.benchmark.workload import RequestSpec

CHAT = "chat/completions"


def is_chat(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith(CHAT)


def build_body(spec: RequestSpec, *, model: str, endpoint: str, ignore_eos: bool = True) -> dict:
    """The request body: token-id prompt for completions, a user message for chat."""
    body: dict = {"model": model}
    if is_chat(endpoint):
        prompt = spec.prompt if isinstance(spec.prompt, str) else " ".join(map(str, spec.prompt))
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = spec.prompt
    body.update({"max_tokens": spec.output_len, "stream": True, "stream_options": {"include_usage": True},
                 "temperature": 0})
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _error_message(status: int, raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or err)
        elif isinstance(err, str):
            text = err
    except ValueError:
        pass
    text = " ".join(text.split())[:300]
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def _chunk_text(choice: dict) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def send_request(client: httpx.AsyncClient, url: str, body: dict, spec: RequestSpec,
                       t0: float) -> RequestResult:
    """POST ``body`` with SSE streaming; never raises (a failure is recorded in the result).

    ``t0`` is the run's start (``time.perf_counter()``); ``result.start`` is relative to it.
    """
    res = RequestResult(index=spec.index, input_len=spec.input_len, output_len=spec.output_len,
                        prompt_tokens=spec.input_len)
    send = time.perf_counter()
    res.start = send - t0
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            res.http_status = resp.status_code
            if resp.status_code != 200:
                res.error = _error_message(resp.status_code, await resp.aread())
                return res
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    msg = json.loads(data)
                except ValueError:
                    res.error = f"bad SSE data: {data[:200]}"
                    return res
                if not isinstance(msg, dict):
                    continue
                if msg.get("error"):
                    err = msg["error"]
                    res.error = "stream error: " + str(err.get("message", err) if isinstance(err, dict) else err)
                    return res
                now = time.perf_counter()
                choices = msg.get("choices") or []
                if choices and _chunk_text(choices[0]):
                    if last is None:
                        res.ttft = now - send
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                usage = msg.get("usage")
                if isinstance(usage, dict):
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        res.prompt_tokens = int(usage["prompt_tokens"])
        if last is None:
            res.error = "the stream carried no tokens"
            return res
        res.output_tokens = usage_tokens if usage_tokens is not None else chunks
        res.success = True
        return res
    except httpx.TimeoutException as exc:
        res.error = f"timeout ({type(exc).__name__})"
        return res
    except (httpx.HTTPError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res
    finally:
        res.latency = time.perf_counter() - send
