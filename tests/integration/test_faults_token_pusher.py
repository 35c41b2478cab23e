"""The worker's `TokenPusher` across a gateway's death, in one process on loopback: a real grpc.aio
TokenSink server is stopped and another started on the same port, as a gateway restart does.

    restart   the first batch pushed after the restart reaches the new sink (gRPC's orphaned request
              iterator of the broken stream used to take it, and the restarted gateway's first
              request waited forever for its first token)
    gone      a sink unreachable for `sink_lost_after_s` is a gateway gone: the requests whose tokens
              queued for it are aborted on the worker (its own Abort), finished ones are not
"""
from __future__ import annotations

import asyncio

import pytest

from services.common.grpc_util import aio_server, bind
from services.gen.ferry.v1 import token_sink_pb2 as pb
from services.gen.ferry.v1 import token_sink_pb2_grpc as pb_grpc
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
from services.worker.token_pusher import TokenPusher
from tests.procs import free_port

pytestmark = pytest.mark.integration


class Sink(pb_grpc.TokenSinkServicer):
    def __init__(self) -> None:
        self.events: list[pb.TokenEvent] = []

    async def Push(self, request_iterator, context) -> pb.PushReply:
        async for batch in request_iterator:
            self.events.extend(batch.events)
        return pb.PushReply()


class Worker(worker_pb2_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def Abort(self, request, context) -> worker_pb2.AbortReply:
        self.aborted.append(request.request_id)
        return worker_pb2.AbortReply(found=True)


async def serve(servicer, add, port: int) -> asyncio.AbstractServer:
    server = aio_server()
    add(servicer, server)
    bind(server, "127.0.0.1", port)
    await server.start()
    return server


async def until(check, timeout: float = 20.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def token(rid: str, index: int, finish: str = "") -> list[pb.TokenEvent]:
    return [pb.TokenEvent(request_id=rid, index=index, token_ids=[index], finish_reason=finish)]


async def test_the_first_batch_after_a_gateway_restart_reaches_the_new_gateway():
    port = free_port()
    sink = f"127.0.0.1:{port}"
    first = Sink()
    server = await serve(first, pb_grpc.add_TokenSinkServicer_to_server, port)
    pusher = TokenPusher("127.0.0.1:1", sink_lost_after_s=60)
    try:
        pusher.push(sink, token("a", 0))
        assert await until(lambda: len(first.events) == 1)
        await server.stop(None)                         # the gateway dies while the worker is idle
        await asyncio.sleep(1.0)
        second = Sink()
        server = await serve(second, pb_grpc.add_TokenSinkServicer_to_server, port)
        pusher.push(sink, token("b", 0))                # the restarted gateway's first request
        assert await until(lambda: any(e.request_id == "b" for e in second.events), timeout=10), \
            "the new gateway never got the first batch"
    finally:
        await pusher.close()
        await server.stop(None)


async def test_requests_of_a_gateway_gone_for_good_are_aborted_on_the_worker():
    sink_port, worker_port = free_port(), free_port()
    sink = f"127.0.0.1:{sink_port}"
    gateway = Sink()
    server = await serve(gateway, pb_grpc.add_TokenSinkServicer_to_server, sink_port)
    worker = Worker()
    worker_server = await serve(worker, worker_pb2_grpc.add_WorkerServicer_to_server, worker_port)
    pusher = TokenPusher(f"127.0.0.1:{worker_port}", sink_lost_after_s=1.0)
    try:
        pusher.push(sink, token("a", 0) + token("b", 0) + token("c", 0))
        assert await until(lambda: len(gateway.events) == 3)
        await server.stop(None)                         # the gateway dies for good
        for i in range(1, 40):                          # the engine goes on stepping: a batch a step
            pusher.push(sink, token("a", i) + token("b", i) + (token("c", 1, "length") if i == 1 else []))
            await asyncio.sleep(0.05)
        assert await until(lambda: sorted(set(worker.aborted)) == ["a", "b"], timeout=10), worker.aborted
        assert "c" not in worker.aborted, "a request that finished is not aborted"
    finally:
        await pusher.close()
        await worker_server.stop(None)
