"""`TokenPusher`: a worker's token streams to gateways — one long-lived `TokenSink.Push` per gateway.

Each engine step produces at most one `TokenBatch` per gateway. A stream that breaks (gateway
restart) is reopened on a fresh channel (a channel that failed to connect waits out gRPC's reconnect
backoff, up to minutes, before it tries again: a gateway back in a second would get no tokens);
batches queued meanwhile are sent on the new stream, and the gateway's per-request `index` check drops
anything it has seen already.

A gateway that stays unreachable for SINK_LOST_AFTER_S is gone, and so are its clients: the requests
whose tokens queued up for it meanwhile are aborted here (the Abort the gateway would have sent), so
they stop holding a batch slot and KV blocks for nobody, and their queued tokens are dropped.

    Push ok ─ breaks ─▶ reopen every RETRY_DELAY_S ─ ok ─▶ streaming again
                             │ still failing after SINK_LOST_AFTER_S
                             ▼
                        abort the queued batches' requests, drop the batches
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from services.common.grpc_util import aio_channel
from services.gen.ferry.v1 import token_sink_pb2 as pb
from services.gen.ferry.v1 import token_sink_pb2_grpc as pb_grpc
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
RETRY_DELAY_S = 0.2
SINK_LOST_AFTER_S = 10.0     # longer than a gateway restart's blip; short next to a long generation
STREAM_UP_S = 1.0            # a stream that lived this long had reached the gateway: an outage starts anew
ABORT_TIMEOUT_S = 5.0


class TokenPusher:
    def __init__(self, worker_address: str = "", sink_lost_after_s: float = SINK_LOST_AFTER_S) -> None:
        self.worker_address = worker_address      # sent with every batch: the gateway aborts there
        self.sink_lost_after_s = sink_lost_after_s
        self._queues: dict[str, asyncio.Queue[pb.TokenBatch | None]] = {}   # None: end the stream
        self._tasks: dict[str, asyncio.Task] = {}

    def push(self, sink: str, events: list[pb.TokenEvent]) -> None:
        if not events:
            return
        if sink not in self._queues:
            self._queues[sink] = asyncio.Queue()
            self._tasks[sink] = asyncio.create_task(self._stream(sink), name=f"tokens->{sink}")
        self._queues[sink].put_nowait(pb.TokenBatch(events=events, worker_address=self.worker_address))

    async def _stream(self, sink: str) -> None:
        """Write the queue's batches to a Push stream, reopening it when it breaks. Explicit writes, not
        a request iterator: gRPC leaves the iterator of a call the server ended waiting on the queue, and
        that orphan would take the next batch (a restarted gateway would never get it)."""
        queue = self._queues[sink]
        channel: grpc.aio.Channel | None = None
        in_hand: pb.TokenBatch | None = None    # taken from the queue, not yet written to a live stream
        down_since: float | None = None         # when the current outage began
        try:
            while True:
                if in_hand is None:
                    in_hand = await queue.get()     # open a stream only when there is something to send
                    if in_hand is None:             # finish(): nothing more
                        return
                channel = channel or aio_channel(sink)
                opened = time.monotonic()
                call = pb_grpc.TokenSinkStub(channel).Push()
                try:
                    while in_hand is not None:
                        await call.write(in_hand)
                        in_hand = await queue.get()
                    await call.done_writing()       # finish(): end the stream cleanly
                    await call
                    return
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                    code = e.code() if isinstance(e, grpc.aio.AioRpcError) else await call.code()
                call.cancel()
                await channel.close()           # the next attempt connects afresh, with no backoff
                channel = None
                now = time.monotonic()
                if down_since is None or now - opened >= STREAM_UP_S:
                    down_since = now if now - opened >= STREAM_UP_S else opened
                    log.warning("token stream to %s broke (%s); reopening", sink, code.name)
                if now - down_since >= self.sink_lost_after_s:
                    down_since = None
                    if await self._abandon(sink, queue, in_hand):
                        return
                    in_hand = None
                await asyncio.sleep(RETRY_DELAY_S)
        finally:
            if channel is not None:
                await channel.close()

    async def _abandon(self, sink: str, queue: asyncio.Queue, in_hand: pb.TokenBatch | None) -> bool:
        """The gateway at `sink` is gone: abort the requests whose tokens wait for it and drop those
        tokens. True when `finish()` ended the stream meanwhile."""
        batches, end = [in_hand] if in_hand is not None else [], False
        while not queue.empty():
            item = queue.get_nowait()
            end = end or item is None
            if item is not None:
                batches.append(item)
        finished = {e.request_id for b in batches for e in b.events if e.finish_reason}
        request_ids = sorted({e.request_id for b in batches for e in b.events} - finished)
        if request_ids:
            log.warning("token sink %s unreachable for %.0f s: its gateway is gone; aborting its %d running "
                        "request(s)", sink, self.sink_lost_after_s, len(request_ids))
        if request_ids and self.worker_address:
            async with aio_channel(self.worker_address) as channel:       # this worker's own Abort
                stub = worker_pb2_grpc.WorkerStub(channel)
                results = await asyncio.gather(
                    *(stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=ABORT_TIMEOUT_S)
                      for rid in request_ids), return_exceptions=True)
            for rid, result in zip(request_ids, results, strict=True):
                if isinstance(result, Exception):
                    log.warning("abort of %s failed: %s", rid, result)
        return end

    async def finish(self, timeout: float) -> None:
        """Send everything queued and end each stream cleanly (the gateway has it all once its Push
        returns), waiting at most `timeout`; then `close()`."""
        for queue in self._queues.values():
            queue.put_nowait(None)
        if self._tasks:
            await asyncio.wait(self._tasks.values(), timeout=timeout)
        await self.close()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
