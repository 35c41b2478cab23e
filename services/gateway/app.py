"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

With `access` set (`--api-keys-file`), the /v1/ endpoints need an API key and generation requests pass
the key's rate limits (auth.py); /health and /metrics stay open. No handler logs a prompt, an output,
a key or a header.

Every failure is a JSON `error` body with a 4xx/5xx status (never a stack trace); a streamed
request that fails after its first token gets an `error` event before `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from services.common.cluster import Priority
from services.gateway.auth import Access, Admission
from services.gateway.generation import Generation, GenerationError, Plan
from services.gateway.metrics import GatewayMetrics
from services.gateway.protocol import (
    GenerationRequest,
    InvalidRequest,
    check_prompt_size,
    choice,
    decode_body,
    envelope,
    error_body,
    parse_request,
    usage,
)
from services.gateway.scheduler_client import SchedulerClient
from services.gateway.token_sink import TokenSink
from services.gen.ferry.v1 import common_pb2

PRIORITY_TO_PROTO = {Priority.HIGH: common_pb2.PRIORITY_HIGH, Priority.NORMAL: common_pb2.PRIORITY_NORMAL,
                     Priority.LOW: common_pb2.PRIORITY_LOW}

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    """What the handlers share."""
    tokenizer: object
    sink: TokenSink
    sink_address: str
    scheduler: SchedulerClient
    channels: object                   # address -> grpc.aio.Channel
    metrics: GatewayMetrics
    token_timeout_s: float = 120.0
    access: Access | None = None       # None: no API keys (the default)
    max_body_bytes: int | None = None  # larger request bodies get a 413 (None: no limit)


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="Ferry", docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), kind="invalid_request_error"), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", kind="server_error"), 500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": sorted(gw.scheduler.models)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> dict | JSONResponse:
        if gw.access is not None:
            key = gw.access.authenticate(request.headers.get("authorization"))
            if isinstance(key, JSONResponse):
                return key
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "ferry", "max_model_len": info.max_model_len}
            for name, info in sorted(gw.scheduler.models.items())]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(gw, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(gw, request, "chat")

    return app


async def _generate(gw: Gateway, request: Request, kind: str) -> Response:
    endpoint = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    admission = None
    if gw.access is not None:
        key = gw.access.authenticate(request.headers.get("authorization"))
        admission = key if isinstance(key, JSONResponse) else await gw.access.admit_request(key)
        if isinstance(admission, JSONResponse):
            gw.metrics.requests.labels(endpoint, str(admission.status_code)).inc()
            return admission
    response = await _run(gw, request, kind, endpoint, admission)
    if admission is not None:
        response.headers.update(admission.headers)
    return response


async def _run(gw: Gateway, request: Request, kind: str, endpoint: str, admission: Admission | None) -> Response:
    try:
        req = parse_request(kind, decode_body(await read_body(request, gw.max_body_bytes)))
        plan = _plan(gw, req)
    except InvalidRequest as e:
        return _error(gw, endpoint, e)
    if admission is not None and gw.access is not None:
        admitted = await gw.access.admit_tokens(admission, len(plan.prompt_token_ids) + plan.sampling.max_tokens)
        if isinstance(admitted, JSONResponse):
            gw.metrics.requests.labels(endpoint, "429").inc()
            return admitted
    gen = Generation(plan, prefix="cmpl" if kind == "completion" else "chatcmpl", sink=gw.sink,
                     sink_address=gw.sink_address, scheduler=gw.scheduler, channels=gw.channels,
                     tokenizer=gw.tokenizer, token_timeout_s=gw.token_timeout_s, metrics=gw.metrics)
    try:
        await gen.start()
    except GenerationError as e:
        return _error(gw, endpoint, InvalidRequest(str(e), status=e.status), kind=e.kind)
    gw.metrics.running.inc()
    if req.stream:
        return StreamingResponse(_sse(gw, req, gen, endpoint), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": gen.request_id})
    return await _complete(gw, req, gen, request, endpoint)


def _plan(gw: Gateway, req: GenerationRequest) -> Plan:
    info = gw.scheduler.models.get(req.model)
    if info is None:
        known = ", ".join(sorted(gw.scheduler.models)) or "none yet (no worker has registered)"
        raise InvalidRequest(f"the model `{req.model}` does not exist; available: {known}", "model", 404,
                             "model_not_found")
    tok = gw.tokenizer
    check_prompt_size(req, tok, info.max_model_len)
    if req.kind == "chat":
        text = tok.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
    elif isinstance(req.prompt, str):
        ids = tok.encode(req.prompt)
    else:
        ids = list(req.prompt)
        if any(not 0 <= t < len(tok) for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {len(tok)})", "prompt")
    limit = info.max_model_len
    if len(ids) >= limit:
        raise InvalidRequest(f"the prompt is {len(ids)} tokens; this model's context is {limit} tokens "
                             "and generation needs at least one more: shorten the prompt", "prompt")
    max_tokens = req.max_tokens if req.max_tokens is not None else limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise InvalidRequest(f"max_tokens ({max_tokens}) + the prompt ({len(ids)} tokens) exceeds this model's "
                             f"context of {limit} tokens; lower max_tokens to at most {limit - len(ids)}",
                             "max_tokens")
    sampling = common_pb2.SamplingOptions(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                          top_k=req.top_k, stop=list(req.stop), ignore_eos=req.ignore_eos)
    if req.seed is not None:
        sampling.seed = req.seed % 2**63
    return Plan(req.model, ids, sampling, req.stop, info.block_size, PRIORITY_TO_PROTO[req.priority])


async def read_body(request: Request, limit: int | None) -> bytes:
    """The request body, refused with a 413 as soon as it is known to be over `limit` bytes (by its
    Content-Length, or while it streams in), so a huge body is never held whole."""
    too_large = InvalidRequest(f"the request body is over this gateway's limit of {limit} bytes "
                               "(--max-body-mb): send a shorter prompt", status=413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if limit is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if limit is not None and size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _error(gw: Gateway, endpoint: str, e: InvalidRequest, kind: str = "invalid_request_error") -> JSONResponse:
    gw.metrics.requests.labels(endpoint, str(e.status)).inc()
    return JSONResponse(error_body(str(e), e.param, kind, e.code), e.status)


async def _sse(gw: Gateway, req: GenerationRequest, gen: Generation, endpoint: str) -> AsyncIterator[str]:
    created, first, status = int(time.time()), True, "200"
    try:
        async for text, finish in gen.events():
            chunk = envelope(req.kind, gen.request_id, req.model, created, chunk=True)
            chunk["choices"] = [choice(req.kind, text, finish, delta=True, first=first)]
            if req.include_usage:
                chunk["usage"] = None
            first = False
            yield f"data: {json.dumps(chunk)}\n\n"
        if req.include_usage:
            chunk = envelope(req.kind, gen.request_id, req.model, created, chunk=True)
            chunk["choices"] = []
            chunk["usage"] = usage(gen.num_prompt_tokens, gen.num_output_tokens, gen.num_cached_tokens)
            yield f"data: {json.dumps(chunk)}\n\n"
    except GenerationError as e:
        status = str(e.status)
        yield f"data: {json.dumps(error_body(str(e), kind=e.kind))}\n\n"
    except asyncio.CancelledError:            # the client went away: gen.events() aborted the request
        status = "499"
        gw.metrics.aborted.inc()
        raise
    finally:
        _observe(gw, gen, endpoint, status)
    yield "data: [DONE]\n\n"


async def _complete(gw: Gateway, req: GenerationRequest, gen: Generation, request: Request,
                    endpoint: str) -> Response:
    async def collect() -> tuple[str, str]:
        parts, reason = [], "stop"
        async for text, finish in gen.events():
            parts.append(text)
            reason = finish or reason
        return "".join(parts), reason

    task = asyncio.create_task(collect())
    while not task.done():                    # a client that leaves aborts the request on the workers
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            gw.metrics.aborted.inc()
            _observe(gw, gen, endpoint, "499")
            return Response(status_code=499)
    try:
        text, reason = task.result()
    except GenerationError as e:
        _observe(gw, gen, endpoint, str(e.status))
        return JSONResponse(error_body(str(e), kind=e.kind), e.status)
    _observe(gw, gen, endpoint, "200")
    body = envelope(req.kind, gen.request_id, req.model)
    body["choices"] = [choice(req.kind, text, reason, delta=False)]
    body["usage"] = usage(gen.num_prompt_tokens, gen.num_output_tokens, gen.num_cached_tokens)
    return JSONResponse(body)


def _observe(gw: Gateway, gen: Generation, endpoint: str, status: str) -> None:
    m = gw.metrics
    m.running.dec()
    m.requests.labels(endpoint, status).inc()
    m.prompt_tokens.inc(gen.num_prompt_tokens)
    m.generation_tokens.inc(gen.num_output_tokens)
    m.cached_tokens.inc(gen.num_cached_tokens)
    if gen.first_token_at is not None:
        now = time.monotonic()
        ttft = gen.first_token_at - gen.started
        tpot = (now - gen.first_token_at) / (gen.num_output_tokens - 1) if gen.num_output_tokens > 1 else None
        m.ttft.observe(ttft)
        m.e2e.observe(now - gen.started)
        if tpot is not None:
            m.tpot.observe(tpot)
        if status == "200":
            m.observe_slo(ttft, tpot)
