"""The `priority` body field: parsed by name or as vLLM's integer, refused otherwise with an OpenAI error
naming the field, and sent on with the Route and Prefill calls."""
from __future__ import annotations

import asyncio

import pytest

from services.common.cluster import Priority
from services.gateway.app import PRIORITY_TO_PROTO
from services.gateway.generation import Generation, Plan
from services.gateway.protocol import InvalidRequest, parse_request
from services.gateway.token_sink import TokenSink
from services.gen.ferry.v1 import common_pb2, token_sink_pb2

GOOD_CASES = [
    ("absent", None, Priority.NORMAL), ("high", "high", Priority.HIGH), ("normal", "normal", Priority.NORMAL),
    ("low", "low", Priority.LOW), ("vLLM negative", -5, Priority.HIGH), ("vLLM zero", 0, Priority.NORMAL),
    ("vLLM positive", 3, Priority.LOW),
]
BAD_CASES = [("unknown name", "urgent"), ("wrong case", "HIGH"), ("float", 1.5), ("boolean", True),
             ("list", ["high"]), ("empty", "")]


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("value, expected", [c[1:] for c in GOOD_CASES], ids=[c[0] for c in GOOD_CASES])
def test_priority_is_parsed(kind, value, expected):
    body = {"model": "m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    if value is not None:
        body["priority"] = value
    assert parse_request(kind, body).priority is expected


@pytest.mark.parametrize("value", [c[1] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_priority_is_a_400_naming_the_field(value):
    with pytest.raises(InvalidRequest) as error:
        parse_request("completion", {"model": "m", "prompt": "hi", "priority": value})
    assert error.value.param == "priority" and error.value.status == 400
    assert '"high", "normal", "low" or an integer' in str(error.value)


def test_every_priority_has_a_wire_value():
    assert PRIORITY_TO_PROTO == {Priority.HIGH: common_pb2.PRIORITY_HIGH, Priority.NORMAL: common_pb2.PRIORITY_NORMAL,
                                 Priority.LOW: common_pb2.PRIORITY_LOW}


class RecordingScheduler:
    def __init__(self) -> None:
        self.requests = []

    async def route(self, request):
        self.requests.append(request)
        return common_pb2.Instance(address="prefill:1"), common_pb2.Instance(address="decode:1")


class RecordingWorkers:
    """`channels(address)` for WorkerStub: Prefill records its request and pushes the first token."""

    def __init__(self, sink: TokenSink) -> None:
        self.sink, self.prefills = sink, []

    def __call__(self, address: str):
        workers = self

        class Channel:
            def unary_unary(self, method, **_):
                return lambda request, timeout=None: getattr(workers, method.rsplit("/", 1)[1])(request)

            def stream_stream(self, method, **_):
                return None
        return Channel()

    async def Prefill(self, request):
        self.prefills.append(request)
        self.sink.streams[request.request_id].feed(
            token_sink_pb2.TokenEvent(request_id=request.request_id, index=0, token_ids=[0]))
        await asyncio.Event().wait()

    async def Abort(self, request):
        return None


async def test_priority_reaches_route_and_prefill():
    sink, scheduler = TokenSink(), RecordingScheduler()
    workers = RecordingWorkers(sink)
    plan = Plan("m", [1, 2, 3], common_pb2.SamplingOptions(max_tokens=4), (), 16, common_pb2.PRIORITY_HIGH)
    gen = Generation(plan, prefix="cmpl", sink=sink, sink_address="gw:1", scheduler=scheduler, channels=workers,
                     tokenizer=None, token_timeout_s=5)
    await gen.start()
    await gen.abort()
    assert scheduler.requests[0].priority == common_pb2.PRIORITY_HIGH
    assert workers.prefills[0].priority == common_pb2.PRIORITY_HIGH
