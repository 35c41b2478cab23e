"""The gateway's TokenSink: workers push token events; each request's `OutputStream` puts them in order.

Events carry the output position of their first token, so the stream drops repeats and holds events
that arrive early (the first token comes from the prefill worker, the rest from the decode worker,
on different connections):

    arrived:  idx 1..3 (decode)   idx 0 (prefill)      -> emitted: 0, 1, 2, 3
    arrived:  idx 4 twice (a resend after a hand-over) -> emitted once

A stream also knows which worker holds its request now (`holder`: the one whose events went
furthest), so that losing a worker (its Push stream ends and it does not answer, or it says it is
going away) reaches exactly the requests it held, as a `Lost` delta their `Generation` resumes from.
A resumed request runs under a new attempt id (resume.py); events of retired attempts are dropped.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.gen.ferry.v1 import token_sink_pb2, token_sink_pb2_grpc

log = logging.getLogger(__name__)
RESUME = "resume"                    # TokenEvent.finish_reason: the worker is going away, resume elsewhere


@dataclass(frozen=True, slots=True)
class Lost:
    """The request's worker went away with it unfinished; resume it (once per attempt)."""
    reason: str                      # worker_lost | worker_stopping | prefill_failed | scheduler
    attempt_id: str                  # the attempt that was lost (a stale signal names a retired one)
    worker: str = ""                 # the address that went away


@dataclass(frozen=True, slots=True)
class TokenDelta:
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    stop_reason: str | None = None
    error: str | None = None
    lost: Lost | None = None


class OutputStream:
    def __init__(self, request_id: str = "") -> None:
        self._queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self.token_ids: list[int] = []       # emitted in order so far (what a resume starts from)
        self._furthest = 0                   # end of the furthest event seen (its sender is the holder)
        self._early: dict[int, token_sink_pb2.TokenEvent] = {}
        self.finished = False
        self.workers: set[str] = set()       # workers that sent tokens (a migrated request has several)
        self.holder = ""                     # the worker expected to send the next tokens
        self.attempt_id = request_id         # the id the workers know the request by now
        self.retired_ids: set[str] = set()   # earlier attempts: their late events are dropped

    @property
    def _next(self) -> int:
        """The output position of the next token to emit."""
        return len(self.token_ids)

    def feed(self, event: token_sink_pb2.TokenEvent, worker: str = "") -> None:
        if self.finished or event.request_id in self.retired_ids:
            return
        if event.finish_reason == "error":              # errors need no order: end the request now
            self.fail(event.error or "worker error")
            return
        if event.finish_reason == RESUME:               # sent after all of that worker's tokens
            self.lose(Lost("worker_stopping", event.request_id, worker))
            return
        if worker and _end(event) > self._furthest:
            self._furthest, self.holder = _end(event), worker
        held = self._early.get(event.index)
        if held is None or _end(event) > _end(held) or (_end(event) == _end(held) and event.finish_reason):
            self._early[event.index] = event            # of two at one index, keep the one that goes further
        # Emit whatever starts at or before the next position, trimmed to what is new (an early event
        # may overlap one that arrives later: it must not wait forever for its exact index).
        while not self.finished:
            index = min((i for i in self._early if i <= self._next), default=None)
            if index is None:
                return
            ev = self._early.pop(index)
            tokens = tuple(ev.token_ids[self._next - index:])
            if not tokens and not ev.finish_reason:
                continue                                # a repeat
            self.token_ids.extend(tokens)
            self._emit(TokenDelta(tokens, ev.finish_reason or None, ev.stop_reason or None))

    def fail(self, message: str) -> None:
        if not self.finished:
            self._emit(TokenDelta((), "error", error=message))

    def finish(self, reason: str) -> None:
        """End the stream here (a resume found nothing left to generate)."""
        if not self.finished:
            self._emit(TokenDelta((), reason))

    def lose(self, lost: Lost) -> None:
        """Tell the consumer its worker is gone (it decides whether the signal is current)."""
        if not self.finished:
            self._queue.put_nowait(TokenDelta((), lost=lost))

    def start_attempt(self, attempt_id: str, holder: str) -> None:
        """The request runs again as `attempt_id` on `holder`, from the tokens emitted so far: what the
        old attempt sent beyond them (held early) is dropped, and so is anything it sends later."""
        self.retired_ids.add(self.attempt_id)
        self.attempt_id, self.holder = attempt_id, holder
        self._early.clear()
        self._furthest = self._next

    def _emit(self, delta: TokenDelta) -> None:
        self.finished = delta.finish_reason is not None
        self._queue.put_nowait(delta)

    async def next(self, timeout: float) -> TokenDelta:
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that arrives with a token.
        async with asyncio.timeout(timeout):
            return await self._queue.get()


MAX_TOLD = 65536       # unknown request ids remembered, so that each is reported once


class TokenSink(token_sink_pb2_grpc.TokenSinkServicer):
    """Streams by request id (and by every attempt id of a resumed request). `on_push_ended(address)`
    is called when a worker's Push stream ends, normally or not (worker_watch.py decides what it means).
    `on_unknown(address, request_ids)` is called once per request id whose tokens arrive with no stream
    here: a request of a gateway that was restarted, or an attempt given up on; the worker should stop
    it (main.py sends it an Abort)."""

    def __init__(self, on_push_ended: Callable[[str], None] | None = None,
                 on_unknown: Callable[[str, list[str]], None] | None = None) -> None:
        self.streams: dict[str, OutputStream] = {}
        self.on_push_ended = on_push_ended
        self.on_unknown = on_unknown
        self._told: OrderedDict[str, None] = OrderedDict()      # unknown ids already reported (bounded)

    def open(self, request_id: str) -> OutputStream:
        stream = self.streams[request_id] = OutputStream(request_id)
        return stream

    def attach(self, attempt_id: str, stream: OutputStream) -> None:
        """Route the events of a new attempt of a request to its stream."""
        self.streams[attempt_id] = stream

    def close(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            for attempt_id in stream.retired_ids | {stream.attempt_id}:
                self.streams.pop(attempt_id, None)

    def held_by(self, address: str) -> list[OutputStream]:
        """Unfinished streams whose request `address` holds now."""
        unique = {id(s): s for s in self.streams.values()}
        return [s for s in unique.values() if s.holder == address and not s.finished]

    async def Push(self, request_iterator, context) -> token_sink_pb2.PushReply:
        address = ""
        try:
            async for batch in request_iterator:
                address = batch.worker_address or address
                unknown = []
                for event in batch.events:
                    stream = self.streams.get(event.request_id)
                    if stream is None:
                        unknown.append(event.request_id)
                        continue
                    if batch.worker_address:
                        stream.workers.add(batch.worker_address)
                    stream.feed(event, batch.worker_address)
                if unknown and batch.worker_address:
                    self._report_unknown(batch.worker_address, unknown)
        finally:        # ended by the worker, or cancelled because its connection broke (it died)
            if address and self.on_push_ended is not None:
                self.on_push_ended(address)
        return token_sink_pb2.PushReply()


    def _report_unknown(self, address: str, request_ids: list[str]) -> None:
        new = [rid for rid in dict.fromkeys(request_ids) if rid not in self._told]
        for rid in new:
            self._told[rid] = None
        while len(self._told) > MAX_TOLD:
            self._told.popitem(last=False)
        if new and self.on_unknown is not None:
            self.on_unknown(address, new)


def _end(event: token_sink_pb2.TokenEvent) -> int:
    return event.index + len(event.token_ids)
