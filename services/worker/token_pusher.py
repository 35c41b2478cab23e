"""`TokenPusher`: a worker's token streams to gateways — one long-lived `TokenSink.Push` per gateway.

Each engine step produces at most one `TokenBatch` per gateway. A stream that breaks (gateway
restart) is reopened; batches queued meanwhile are sent on the new stream, and the gateway's
per-request `index` check drops anything it has seen already.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from services.common.grpc_util import aio_channel
from services.gen.ferry.v1 import token_sink_pb2 as pb
from services.gen.ferry.v1 import token_sink_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
RETRY_DELAY_S = 0.2


class TokenPusher:
    def __init__(self, worker_address: str = "") -> None:
        self.worker_address = worker_address      # sent with every batch: the gateway aborts there
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
        queue = self._queues[sink]
        channel = aio_channel(sink)
        stub = pb_grpc.TokenSinkStub(channel)
        ended = False                           # finish() queued the end: close the stream cleanly

        async def batches(first: pb.TokenBatch):
            nonlocal ended
            yield first
            while (batch := await queue.get()) is not None:
                yield batch
            ended = True

        try:
            while not ended:
                batch = await queue.get()       # open a stream only when there is something to send
                if batch is None:
                    return
                try:
                    await stub.Push(batches(batch))
                except grpc.aio.AioRpcError as e:
                    log.warning("token stream to %s broke (%s); reopening", sink, e.code().name)
                    await asyncio.sleep(RETRY_DELAY_S)
        finally:
            await channel.close()

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
