"""Noticing that a worker went away with requests on it, so their `Generation`s resume at once.

Two signs, each confirmed by asking the worker itself (`Stats`, 5 s) before anything happens:

- its TokenSink Push stream ended (the process died: the RPC is cancelled; or it stopped). A worker
  that only lost the connection (a gateway blip) answers, reopens its stream and keeps its requests;
- the scheduler lists it unhealthy or no more (its heartbeats stopped): a hung or partitioned worker
  whose connection has not broken.

Then every unfinished stream it holds (`OutputStream.holder`) gets a `Lost` delta. A worker that says
it is going away (TokenEvent finish_reason "resume", after its KV checkpoint) needs no check: the
stream handles that event itself.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from services.gateway.token_sink import Lost, TokenSink
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
# A dead worker refuses the probe at once; the timeout only decides when a live but CPU-starved one
# (heartbeats late, Stats slow) is taken for dead, and resuming its requests elsewhere would only add load.
PROBE_TIMEOUT_S = 5.0
ABORT_TIMEOUT_S = 5.0


async def is_alive(channels: Callable[[str], grpc.aio.Channel], address: str) -> bool:
    """The worker at `address` answers `Stats` within PROBE_TIMEOUT_S."""
    try:
        await worker_pb2_grpc.WorkerStub(channels(address)).Stats(worker_pb2.StatsRequest(),
                                                                  timeout=PROBE_TIMEOUT_S)
    except grpc.aio.AioRpcError:
        return False
    return True


class WorkerWatch:
    def __init__(self, sink: TokenSink, channels: Callable[[str], grpc.aio.Channel]) -> None:
        self.sink = sink
        self.channels = channels
        self._checking: dict[str, asyncio.Task] = {}     # address -> its check in flight (one at a time)
        self._healthy: set[str] = set()                  # addresses the scheduler listed healthy last time
        self._aborts: set[asyncio.Task] = set()          # Aborts in flight (held until done)

    def tokens_unclaimed(self, address: str, request_ids: list[str]) -> None:
        """TokenSink.on_unknown: tokens came for requests no client here waits for (this gateway was
        restarted, or gave the attempt up): tell the worker to stop them instead of generating on."""
        task = asyncio.create_task(self._abort(address, request_ids), name=f"abort on {address}")
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, address: str, request_ids: list[str]) -> None:
        stub = worker_pb2_grpc.WorkerStub(self.channels(address))
        for rid in request_ids:
            try:
                await stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=ABORT_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:       # gone already: nothing runs there
                log.debug("abort of unclaimed %s on %s: %s", rid, address, e.code().name)
        log.info("stopped %d request(s) on %s that no client here waits for", len(request_ids), address)

    def push_ended(self, address: str) -> None:
        """TokenSink.on_push_ended: a worker's Push stream ended."""
        self._check(address, "worker_lost")

    def scheduler_listed(self, healthy_addresses: set[str]) -> None:
        """SchedulerClient.on_refresh: workers that were healthy and are not any more are checked."""
        for address in self._healthy - healthy_addresses:
            self._check(address, "scheduler")
        self._healthy = set(healthy_addresses)

    def _check(self, address: str, reason: str) -> None:
        if address in self._checking or not self.sink.held_by(address):
            return
        task = asyncio.create_task(self._confirm(address, reason), name=f"check {address}")
        self._checking[address] = task
        task.add_done_callback(lambda _: self._checking.pop(address, None))

    async def _confirm(self, address: str, reason: str) -> None:
        if await is_alive(self.channels, address):
            return
        streams = self.sink.held_by(address)
        if streams:
            log.warning("worker %s is gone (%s) with %d unfinished requests: resuming them elsewhere",
                        address, reason, len(streams))
        for stream in streams:
            stream.lose(Lost(reason, stream.attempt_id, address))
