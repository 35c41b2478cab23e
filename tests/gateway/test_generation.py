"""`Generation` with fake workers: a client that leaves aborts the request on every worker, even when
its response task keeps being cancelled (Starlette's anyio cancel scope), and the sink forgets it; a
refused prefill is an HTTP error and the decode worker that admitted the request is told."""
from __future__ import annotations

import asyncio

import anyio
import grpc
import pytest

from services.gateway.generation import Generation, GenerationError, Plan
from services.gateway.token_sink import TokenSink
from services.gen.ferry.v1 import common_pb2, token_sink_pb2, worker_pb2


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class FakeScheduler:
    async def route(self, request):
        return common_pb2.Instance(address="prefill:1"), common_pb2.Instance(address="decode:1")


class FakeWorkers:
    """`channels(address)` for WorkerStub: Prefill pushes the first token then hands off (never
    returns, or fails with `prefill_error`); Abort takes a moment, then records the address."""

    def __init__(self, sink: TokenSink, prefill_error: grpc.aio.AioRpcError | None = None) -> None:
        self.sink = sink
        self.prefill_error = prefill_error
        self.aborted: list[str] = []

    def __call__(self, address: str):
        workers = self

        class Channel:
            def unary_unary(self, method, **_):
                name = method.rsplit("/", 1)[1]
                return lambda request, timeout=None: getattr(workers, name)(address, request)

            def stream_stream(self, method, **_):
                return None                         # PushKV: not used by the gateway
        return Channel()

    async def Prefill(self, address, request):
        if self.prefill_error is not None:
            raise self.prefill_error
        self.sink.streams[request.request_id].feed(
            token_sink_pb2.TokenEvent(request_id=request.request_id, index=0, token_ids=[0]))
        await asyncio.Event().wait()
        return worker_pb2.PrefillReply()

    async def Abort(self, address, request):
        await asyncio.sleep(0.05)
        self.aborted.append(address)
        return worker_pb2.AbortReply(found=True)


def generation(sink: TokenSink, workers: FakeWorkers) -> Generation:
    plan = Plan("m", [1, 2, 3], common_pb2.SamplingOptions(max_tokens=100), (), 16)
    return Generation(plan, prefix="cmpl", sink=sink, sink_address="gw:1", scheduler=FakeScheduler(),
                      channels=workers, tokenizer=FakeTokenizer(), token_timeout_s=5)


async def test_abort_reaches_every_worker_although_the_response_task_is_cancelled():
    sink = TokenSink()
    workers = FakeWorkers(sink)
    gen = generation(sink, workers)
    await gen.start()
    texts = []
    with anyio.CancelScope() as scope:              # what StreamingResponse does when the client leaves
        async for text, _ in gen.events():
            texts.append(text)
            scope.cancel()
    assert texts == ["a"]
    assert gen.request_id not in sink.streams, "the sink forgets the request at once"
    for _ in range(50):
        if len(workers.aborted) == 2:
            break
        await asyncio.sleep(0.02)
    assert sorted(workers.aborted) == ["decode:1", "prefill:1"]


async def test_tokens_after_the_first_arrive_in_order_and_finish():
    sink = TokenSink()
    workers = FakeWorkers(sink)
    gen = generation(sink, workers)
    await gen.start()
    stream = sink.streams[gen.request_id]
    stream.feed(token_sink_pb2.TokenEvent(request_id=gen.request_id, index=2, token_ids=[2],
                                          finish_reason="length"))
    stream.feed(token_sink_pb2.TokenEvent(request_id=gen.request_id, index=1, token_ids=[1]))
    events = [e async for e in gen.events()]
    assert "".join(t for t, _ in events) == "abc" and events[-1][1] == "length"
    assert gen.num_output_tokens == 3 and gen.request_id not in sink.streams
    assert workers.aborted == [], "a finished request is not aborted"


async def test_a_refused_prefill_is_a_4xx_with_the_workers_message():
    sink = TokenSink()
    error = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 details="prompt too long: shorten it")
    workers = FakeWorkers(sink, prefill_error=error)
    gen = generation(sink, workers)
    with pytest.raises(GenerationError) as info:
        await gen.start()
    assert info.value.status == 400 and "shorten" in str(info.value)
    assert gen.request_id not in sink.streams
    assert workers.aborted == ["decode:1"], "the decode worker forgets the request it admitted"
