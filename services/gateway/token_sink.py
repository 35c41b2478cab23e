"""The gateway's TokenSink: workers push token events; each request's `OutputStream` puts them in order.

Events carry the output position of their first token, so the stream drops repeats and holds events
that arrive early (the first token comes from the prefill worker, the rest from the decode worker,
on different connections):

    arrived:  idx 1..3 (decode)   idx 0 (prefill)      -> emitted: 0, 1, 2, 3
    arrived:  idx 4 twice (a resend after a hand-over) -> emitted once
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.gen.ferry.v1 import token_sink_pb2, token_sink_pb2_grpc


@dataclass(frozen=True, slots=True)
class TokenDelta:
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    stop_reason: str | None = None
    error: str | None = None


class OutputStream:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._next = 0
        self._early: dict[int, token_sink_pb2.TokenEvent] = {}
        self.finished = False
        self.workers: set[str] = set()       # workers that sent tokens (a migrated request has several)

    def feed(self, event: token_sink_pb2.TokenEvent) -> None:
        if self.finished:
            return
        if event.finish_reason == "error":              # errors need no order: end the request now
            self.fail(event.error or "worker error")
            return
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
            self._next += len(tokens)
            self._emit(TokenDelta(tokens, ev.finish_reason or None, ev.stop_reason or None))

    def fail(self, message: str) -> None:
        if not self.finished:
            self._emit(TokenDelta((), "error", error=message))

    def _emit(self, delta: TokenDelta) -> None:
        self.finished = delta.finish_reason is not None
        self._queue.put_nowait(delta)

    async def next(self, timeout: float) -> TokenDelta:
        return await asyncio.wait_for(self._queue.get(), timeout)


class TokenSink(token_sink_pb2_grpc.TokenSinkServicer):
    def __init__(self) -> None:
        self.streams: dict[str, OutputStream] = {}

    def open(self, request_id: str) -> OutputStream:
        stream = self.streams[request_id] = OutputStream()
        return stream

    def close(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    async def Push(self, request_iterator, context) -> token_sink_pb2.PushReply:
        async for batch in request_iterator:
            for event in batch.events:
                stream = self.streams.get(event.request_id)
                if stream is not None:                  # unknown: the client left; the worker is told
                    if batch.worker_address:
                        stream.workers.add(batch.worker_address)
                    stream.feed(event)
        return token_sink_pb2.PushReply()


def _end(event: token_sink_pb2.TokenEvent) -> int:
    return event.index + len(event.token_ids)
