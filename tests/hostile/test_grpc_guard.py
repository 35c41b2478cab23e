"""services.common.grpc_guard on an in-process server: well-formed calls of all four kinds behave as
without it (replies, streams, a client's cancellation reaching the servicer), and bytes that are no
protobuf end the call with INVALID_ARGUMENT — on a request stream, after the good messages before them."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.grpc_guard import RequestGuard
from services.gen.ferry.v1 import worker_pb2 as pb

BAD = b"\x0a\xff\xff\xff\x0f"
Req, Reply = pb.AbortRequest, pb.AbortReply


class Echo:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.cancelled = asyncio.Event()

    async def unary(self, request, context):
        return Reply(found=request.request_id == "x")

    async def server_stream(self, request, context):
        for _ in range(3):
            yield Reply(found=True)

    async def client_stream(self, requests, context):
        async for r in requests:
            self.seen.append(r.request_id)
        return Reply(found=bool(self.seen))

    async def bidi(self, requests, context):
        try:
            async for r in requests:
                self.seen.append(r.request_id)
                if r.request_id == "hang":
                    await asyncio.sleep(3600)
                yield Reply(found=True)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
async def served():
    echo = Echo()
    parse, write = Req.FromString, Reply.SerializeToString
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary, parse, write),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream, parse, write),
        "ClientStream": grpc.stream_unary_rpc_method_handler(echo.client_stream, parse, write),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi, parse, write),
    }
    server = grpc.aio.server(interceptors=[RequestGuard()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield echo, channel
    await channel.close()
    await server.stop(None)


def method(channel, kind: str, name: str, raw: bool = False):
    make = {"uu": channel.unary_unary, "us": channel.unary_stream, "su": channel.stream_unary,
            "ss": channel.stream_stream}[kind]
    return make(f"/t.Echo/{name}", request_serializer=None if raw else Req.SerializeToString,
                response_deserializer=Reply.FromString)


async def test_well_formed_calls_pass_through(served):
    echo, ch = served
    assert (await method(ch, "uu", "Unary")(Req(request_id="x"))).found
    assert [r.found async for r in method(ch, "us", "ServerStream")(Req())] == [True] * 3
    assert (await method(ch, "su", "ClientStream")(iter([Req(request_id="a"), Req(request_id="b")]))).found
    assert len([r async for r in method(ch, "ss", "Bidi")(iter([Req(request_id="c")] * 2))]) == 2
    assert echo.seen == ["a", "b", "c", "c"]


@pytest.mark.parametrize("kind,name", [("uu", "Unary"), ("us", "ServerStream"), ("su", "ClientStream"),
                                       ("ss", "Bidi")])
async def test_bytes_that_are_no_protobuf_are_invalid_argument(served, kind, name):
    echo, ch = served
    call = method(ch, kind, name, raw=True)
    arg = BAD if kind in ("uu", "us") else iter([Req(request_id="ok").SerializeToString(), BAD])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call(arg, timeout=5)
        if kind in ("us", "ss"):
            [r async for r in result]
        else:
            await result
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf" in info.value.details()
    assert echo.seen == ([] if kind in ("uu", "us") else ["ok"])


async def test_a_client_cancel_still_reaches_the_servicer(served):
    echo, ch = served
    call = method(ch, "ss", "Bidi")(iter([Req(request_id="hang")]))
    while "hang" not in echo.seen:
        await asyncio.sleep(0.01)
    call.cancel()
    await asyncio.wait_for(echo.cancelled.wait(), 5)
