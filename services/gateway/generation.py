"""One request's life in the gateway: route → Prefill → tokens from the TokenSink → text → done.

    start()    route with the scheduler, open the output stream, call Prefill on the chosen worker;
               returns once the first token is in (or raises `GenerationError` with an HTTP status)
    events()   (text delta, finish_reason) as tokens arrive, stop strings applied
    abort()    the client left: the workers drop the request and free its blocks

A request whose worker goes away before it finishes (the process died, the Prefill or its KV
hand-off failed as UNAVAILABLE, the worker said it is stopping) is resumed, at most MAX_RESUMES
times: routed again without the lost instance and prefilled with its prompt + the output so far,
its new tokens continuing the same output stream (resume.py). Only the one consumer of the stream
(`_next_delta`) resumes, once per lost attempt, so a request never resumes twice at once.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from services.common.block_keys import chain_keys
from services.gateway.detokenizer import Detokenizer
from services.gateway.resume import MAX_RESUMES, ResumePoint, attempt_id, resume_point, route_waits
from services.gateway.scheduler_client import NoRoute, SchedulerClient
from services.gateway.token_sink import Lost, OutputStream, TokenDelta, TokenSink
from services.gateway.worker_watch import is_alive
from services.gen.ferry.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
_background: set[asyncio.Task] = set()          # abort calls in flight (asyncio keeps only weak references)
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.FAILED_PRECONDITION: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}
# A Prefill that fails so lost its worker (or the decode worker it handed the KV to), not the request.
RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


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


@dataclass(eq=False)
class Attempt:
    """One run of the request on the workers (the first, or a resume), under its own id."""
    id: str
    prefill: common_pb2.Instance
    decode: common_pb2.Instance | None             # None: the prefill instance decodes too
    num_prompt_tokens: int = 0                     # the original prompt + the output it resumes from
    may_hold: set[str] = field(default_factory=set)   # addresses that may hold it (to abort there)
    prefill_call: asyncio.Task | None = None

    @property
    def instances(self) -> list[common_pb2.Instance]:
        return [self.prefill] + ([self.decode] if self.decode is not None else [])


class Generation:
    def __init__(self, plan: Plan, *, prefix: str, sink: TokenSink, sink_address: str,
                 scheduler: SchedulerClient, channels, tokenizer, token_timeout_s: float,
                 metrics=None) -> None:
        self.plan = plan
        self.request_id = f"{prefix}-{uuid.uuid4().hex}"
        self.sink, self.sink_address, self.scheduler = sink, sink_address, scheduler
        self.channels = channels
        self.metrics = metrics                      # GatewayMetrics, or None (tests)
        self.detokenizer = Detokenizer(tokenizer, plan.stop)
        self.token_timeout_s = token_timeout_s
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.num_resumes = 0
        self.finished = False
        self._attempt: Attempt | None = None
        self._excluded_ids: set[str] = set()        # instances this request lost (never routed to again)
        self._failure: GenerationError | None = None   # why the stream failed, with its HTTP status
        self._stream: OutputStream | None = None
        self._first: TokenDelta | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.plan.prompt_token_ids)

    async def start(self) -> None:
        plan = self.plan
        self._stream = self.sink.open(self.request_id)
        try:
            await self._launch(ResumePoint(plan.prompt_token_ids, 0, plan.sampling.max_tokens))
            self._first = await self._next_delta()
            if self._first.error:           # before any token: an HTTP error rather than a broken stream
                raise self._failure or GenerationError(self._first.error, 500)
        except BaseException:
            await self.abort()
            raise

    async def events(self) -> AsyncIterator[tuple[str, str | None]]:
        delta, self._first = self._first, None
        try:
            while True:
                if delta is None:
                    delta = await self._next_delta()
                if delta.error:
                    raise self._failure or GenerationError(delta.error, 500)
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.num_output_tokens += len(delta.token_ids)
                finish = delta.finish_reason
                text = self.detokenizer.add(delta.token_ids, final=finish is not None)
                if finish is None and self.detokenizer.stopped:
                    finish = "stop"     # a stop string across a resume, which the new worker cannot see
                    await self.abort()
                if finish is not None:
                    self.finished = True
                    yield text, finish
                    return
                if text:
                    yield text, None
                delta = None
        finally:
            self.sink.close(self.request_id)
            if not self.finished:
                await self.abort()

    async def _next_delta(self) -> TokenDelta:
        """The next delta with tokens, a finish or an error; resumes the request whenever its current
        attempt is lost (older attempts' signals are stale: that loss was handled already)."""
        while True:
            try:
                delta = await self._stream.next(self.token_timeout_s)
            except TimeoutError:
                raise GenerationError(f"no token for {self.token_timeout_s} s from the workers",
                                      504, "timeout") from None
            if delta.lost is None:
                return delta
            if delta.lost.attempt_id == self._attempt.id:
                await self._resume(delta.lost)

    # ---- attempts -----------------------------------------------------------------------------
    async def _launch(self, point: ResumePoint) -> None:
        """Route and start an attempt at `point`: Prefill runs in a task; its tokens reach the stream."""
        plan, aid = self.plan, attempt_id(self.request_id, self.num_resumes)
        sampling = common_pb2.SamplingOptions()
        sampling.CopyFrom(plan.sampling)
        sampling.max_tokens = point.max_tokens
        prefill, decode = await self._route(scheduler_pb2.RouteRequest(
            request_id=aid, model=plan.model, block_keys=chain_keys(point.prompt_token_ids, plan.block_size),
            num_prompt_tokens=len(point.prompt_token_ids), max_tokens=point.max_tokens, priority=plan.priority,
            exclude_instance_ids=sorted(self._excluded_ids)))
        colocated = decode.address == prefill.address
        attempt = Attempt(aid, prefill, None if colocated else decode, len(point.prompt_token_ids),
                          {prefill.address, decode.address})
        if self._attempt is None:
            self._stream.holder = prefill.address
        else:
            self.sink.attach(aid, self._stream)
            self._stream.start_attempt(aid, prefill.address)
        self._attempt = attempt
        request = worker_pb2.PrefillRequest(
            request_id=aid, prompt_token_ids=point.prompt_token_ids, sampling=sampling,
            sink_address=self.sink_address, decode_address="" if colocated else decode.address,
            priority=plan.priority, output_offset=point.output_offset)
        stub = worker_pb2_grpc.WorkerStub(self.channels(prefill.address))

        async def call() -> worker_pb2.PrefillReply:
            return await stub.Prefill(request)

        attempt.prefill_call = asyncio.create_task(call())
        attempt.prefill_call.add_done_callback(functools.partial(self._on_prefill_done, attempt))

    async def _route(self, request: scheduler_pb2.RouteRequest) -> tuple[common_pb2.Instance, common_pb2.Instance]:
        """The scheduler's route; a resume waits for one a while (a replacement may be starting)."""
        waits = route_waits() if self.num_resumes else []
        while True:
            try:
                return await self.scheduler.route(request)
            except NoRoute as e:
                if not waits:
                    raise GenerationError(f"no worker can take the request now: {e}", 503,
                                          "service_unavailable") from None
            await asyncio.sleep(waits.pop(0))

    def _on_prefill_done(self, attempt: Attempt, task: asyncio.Task) -> None:
        if task.cancelled() or attempt is not self._attempt or self.finished:
            return
        error = task.exception()
        if error is None:
            reply = task.result()
            if self.num_resumes == 0:
                self.num_cached_tokens = reply.num_cached_tokens
            elif self.metrics is not None:
                self.metrics.resume_prompt_tokens.inc(attempt.num_prompt_tokens)
                self.metrics.resume_cached_tokens.inc(reply.num_cached_tokens)
            if reply.handed_off and self._stream.holder == attempt.prefill.address:
                self._stream.holder = attempt.decode.address      # the tokens come from there now
            return
        attempt.may_hold.discard(attempt.prefill.address)         # a failed Prefill dropped it there
        if isinstance(error, grpc.aio.AioRpcError) and error.code() in RESUMABLE:
            self._stream.lose(Lost("prefill_failed", attempt.id, attempt.prefill.address))
        else:                                   # e.g. the request is invalid: resuming cannot help
            self._failure = _as_generation_error(error)
            self._stream.fail(str(self._failure))

    async def _resume(self, lost: Lost) -> None:
        """Run the request again elsewhere from the output the stream has (see resume.py)."""
        old = self._attempt
        self.num_resumes += 1
        if self.metrics is not None:
            self.metrics.resumes.labels(lost.reason).inc()
        # wherever the lost attempt may still run (a worker that only seemed gone, a migration's destination)
        _spawn(self._abort_attempt(old, (old.may_hold | self._stream.workers | {lost.worker}) - {""}))
        if self.num_resumes > MAX_RESUMES:
            if self.metrics is not None:
                self.metrics.resumes_exhausted.inc()
            raise GenerationError(f"the request lost its worker {self.num_resumes} times (last: {lost.reason} "
                                  f"at {lost.worker or old.prefill.address}); giving up", 503, "service_unavailable")
        self._excluded_ids |= await self._lost_instance_ids(old, lost)
        log.warning("%s: %s at %s after %d tokens; resuming (%d of at most %d), avoiding %s", self.request_id,
                    lost.reason, lost.worker or "?", len(self._stream.token_ids), self.num_resumes, MAX_RESUMES,
                    sorted(self._excluded_ids))
        point = resume_point(self.plan.prompt_token_ids, self._stream.token_ids, self.plan.sampling.max_tokens)
        if point is None:
            self._stream.finish("length")
            return
        await self._launch(point)

    async def _lost_instance_ids(self, attempt: Attempt, lost: Lost) -> set[str]:
        """The instances to avoid from now on: the one that went away, and any of the attempt's that does
        not answer (a failed Prefill does not say whether the prefill or the decode worker died)."""
        gone = {lost.worker} if lost.worker and lost.reason != "prefill_failed" else set()
        for instance in attempt.instances:
            if instance.address not in gone and not await is_alive(self.channels, instance.address):
                gone.add(instance.address)
        known = {i.address: i.instance_id for i in attempt.instances}
        return {known.get(a) or self.scheduler.instance_id_at(a) for a in gone} - {""}

    # ---- ending -----------------------------------------------------------------------------
    async def abort(self) -> None:
        """Tell every worker that may hold the request to drop it (idempotent, best effort).

        The Abort calls run in their own task: a client that leaves a stream cancels the response's
        task (and an anyio cancel scope cancels every later await in it too), which must not cancel
        the calls that free the request's blocks."""
        self.finished = True
        self.sink.close(self.request_id)
        attempt = self._attempt
        if attempt is None:
            return
        if attempt.prefill_call is not None and not attempt.prefill_call.done():
            attempt.prefill_call.cancel()
        others = self._stream.workers if self._stream is not None else set()
        await self._in_background(self._abort_attempt(attempt, attempt.may_hold | others))

    @staticmethod
    async def _in_background(coro) -> None:
        """Await `coro` in a task of its own: cancelling the caller does not cancel it."""
        await asyncio.shield(_spawn(coro))

    async def _abort_attempt(self, attempt: Attempt, addresses: set[str]) -> None:
        if attempt.prefill_call is not None and not attempt.prefill_call.done():
            attempt.prefill_call.cancel()
        calls = [worker_pb2_grpc.WorkerStub(self.channels(a)).Abort(
            worker_pb2.AbortRequest(request_id=attempt.id), timeout=5) for a in sorted(addresses)]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.info("abort of %s failed: %s", attempt.id, result)


def _spawn(coro) -> asyncio.Task:
    task = asyncio.create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def _as_generation_error(error: BaseException) -> GenerationError:
    if isinstance(error, grpc.aio.AioRpcError):
        status = HTTP_STATUS.get(error.code(), 500)
        kind = "invalid_request_error" if status == 400 else "service_unavailable" if status == 503 else "server_error"
        return GenerationError(error.details() or error.code().name, status, kind)
    return GenerationError(str(error) or type(error).__name__, 500)
