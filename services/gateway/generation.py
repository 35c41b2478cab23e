"""One request's life in the gateway: route → Prefill → tokens from the TokenSink → text → done.

    start()    route with the scheduler, open the output stream, call Prefill on the chosen worker;
               returns once the first token is in (or raises `GenerationError` with an HTTP status)
    events()   (text delta, finish_reason) as tokens arrive, stop strings applied
    abort()    the client left: the workers drop the request and free its blocks
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from services.common.block_keys import chain_keys
from services.gateway.detokenizer import Detokenizer
from services.gateway.scheduler_client import NoRoute, SchedulerClient
from services.gateway.token_sink import TokenDelta, TokenSink
from services.gen.ferry.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
_background: set[asyncio.Task] = set()          # abort calls in flight (asyncio keeps only weak references)
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.FAILED_PRECONDITION: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}


class GenerationError(Exception):
    def __init__(self, message: str, status: int = 500, kind: str = "server_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated request, ready to run."""
    model: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingOptions
    stop: tuple[str, ...]
    block_size: int
    priority: int = common_pb2.PRIORITY_NORMAL   # common_pb2.Priority


class Generation:
    def __init__(self, plan: Plan, *, prefix: str, sink: TokenSink, sink_address: str,
                 scheduler: SchedulerClient, channels, tokenizer, token_timeout_s: float) -> None:
        self.plan = plan
        self.request_id = f"{prefix}-{uuid.uuid4().hex}"
        self.sink, self.sink_address, self.scheduler = sink, sink_address, scheduler
        self.channels = channels
        self.detokenizer = Detokenizer(tokenizer, plan.stop)
        self.token_timeout_s = token_timeout_s
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finished = False
        self._workers: list[str] = []
        self._stream = None
        self._prefill: asyncio.Task | None = None
        self._first: TokenDelta | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.plan.prompt_token_ids)

    async def start(self) -> None:
        plan = self.plan
        keys = chain_keys(plan.prompt_token_ids, plan.block_size)
        try:
            prefill, decode = await self.scheduler.route(scheduler_pb2.RouteRequest(
                request_id=self.request_id, model=plan.model, block_keys=keys,
                num_prompt_tokens=self.num_prompt_tokens, max_tokens=plan.sampling.max_tokens,
                priority=plan.priority))
        except NoRoute as e:
            raise GenerationError(f"no worker can take the request now: {e}", 503, "service_unavailable") from None
        decode_address = decode.address if decode.address != prefill.address else ""
        self._workers = [prefill.address] + ([decode_address] if decode_address else [])
        stream = self._stream = self.sink.open(self.request_id)
        stub = worker_pb2_grpc.WorkerStub(self.channels(prefill.address))
        request = worker_pb2.PrefillRequest(
            request_id=self.request_id, prompt_token_ids=plan.prompt_token_ids, sampling=plan.sampling,
            sink_address=self.sink_address, decode_address=decode_address, priority=plan.priority)

        async def prefill() -> worker_pb2.PrefillReply:
            return await stub.Prefill(request)

        self._prefill = asyncio.create_task(prefill())
        first = asyncio.create_task(stream.next(self.token_timeout_s))
        await asyncio.wait({self._prefill, first}, return_when=asyncio.FIRST_COMPLETED)
        if self._prefill.done() and self._prefill.exception() is not None:
            first.cancel()
            self.sink.close(self.request_id)
            if len(self._workers) > 1:             # the decode worker may have admitted it already
                await self._in_background(self._abort_on_workers(self._workers[1:]))
            raise _as_generation_error(self._prefill.exception())
        self._prefill.add_done_callback(self._on_prefill_done)
        try:
            self._first = await first
        except TimeoutError:
            await self.abort()
            raise GenerationError(f"no token within {self.token_timeout_s} s", 504, "timeout") from None

    def _on_prefill_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:              # e.g. the KV hand-off failed after the first token
            stream = self.sink.streams.get(self.request_id)
            if stream is not None:
                stream.fail(str(_as_generation_error(task.exception())))
        else:
            self.num_cached_tokens = task.result().num_cached_tokens

    async def events(self) -> AsyncIterator[tuple[str, str | None]]:
        stream = self.sink.streams[self.request_id]
        delta = self._first
        try:
            while True:
                if delta is None:
                    try:
                        delta = await stream.next(self.token_timeout_s)
                    except TimeoutError:
                        raise GenerationError(f"no token for {self.token_timeout_s} s from the workers",
                                              504, "timeout") from None
                if delta.error:
                    raise GenerationError(delta.error, 500)
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.num_output_tokens += len(delta.token_ids)
                final = delta.finish_reason is not None
                text = self.detokenizer.add(delta.token_ids, final=final)
                if final:
                    self.finished = True
                    yield text, delta.finish_reason
                    return
                if text:
                    yield text, None
                delta = None
        finally:
            self.sink.close(self.request_id)
            if not self.finished:
                await self.abort()

    async def abort(self) -> None:
        """Tell every worker that may hold the request to drop it (idempotent, best effort).

        The Abort calls run in their own task: a client that leaves a stream cancels the response's
        task (and an anyio cancel scope cancels every later await in it too), which must not cancel
        the calls that free the request's blocks."""
        self.finished = True
        self.sink.close(self.request_id)
        if self._prefill is not None and not self._prefill.done():
            self._prefill.cancel()
        others = sorted(self._stream.workers - set(self._workers)) if self._stream is not None else []
        await self._in_background(self._abort_on_workers(self._workers + others))

    @staticmethod
    async def _in_background(coro) -> None:
        """Await `coro` in a task of its own: cancelling the caller does not cancel it."""
        task = asyncio.create_task(coro)
        _background.add(task)
        task.add_done_callback(_background.discard)
        await asyncio.shield(task)

    async def _abort_on_workers(self, addresses: list[str]) -> None:
        calls = [worker_pb2_grpc.WorkerStub(self.channels(a)).Abort(
            worker_pb2.AbortRequest(request_id=self.request_id), timeout=5) for a in addresses]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("abort of %s failed: %s", self.request_id, result)


def _as_generation_error(error: BaseException) -> GenerationError:
    if isinstance(error, grpc.aio.AioRpcError):
        status = HTTP_STATUS.get(error.code(), 500)
        kind = "invalid_request_error" if status == 400 else "service_unavailable" if status == 503 else "server_error"
        return GenerationError(error.details() or error.code().name, status, kind)
    return GenerationError(str(error) or type(error).__name__, 500)
