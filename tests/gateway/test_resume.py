"""Resuming a request whose worker went away: the pure bookkeeping (resume.py), the stream's side
(attempts, holder, the "resume" event; token_sink.py, worker_watch.py) and a `Generation` against fake
workers that die on cue: the client's text goes on without a gap, the resumed Prefill carries the
prompt + the output so far with the right offset, and a request that keeps losing workers gets an error."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.gateway.generation import Generation, GenerationError, Plan
from services.gateway.metrics import GatewayMetrics
from services.gateway.resume import MAX_RESUMES, ResumePoint, attempt_id, resume_point, route_waits
from services.gateway.token_sink import Lost, OutputStream, TokenSink
from services.gateway.worker_watch import WorkerWatch
from services.gen.ferry.v1 import common_pb2, token_sink_pb2, worker_pb2
from tests.gateway.test_generation import FakeTokenizer


def ev(index: int, *tokens: int, finish: str = "", rid: str = "r") -> token_sink_pb2.TokenEvent:
    return token_sink_pb2.TokenEvent(request_id=rid, index=index, token_ids=tokens, finish_reason=finish)


# ---- resume.py -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, output, max_tokens, expected", [
    ([1, 2], [], 5, ResumePoint([1, 2], 0, 5)),
    ([1, 2], [7, 8, 9], 5, ResumePoint([1, 2, 7, 8, 9], 3, 2)),
    ([1, 2], [7, 8, 9, 10], 5, ResumePoint([1, 2, 7, 8, 9, 10], 4, 1)),
    ([1, 2], [7, 8, 9, 10, 11], 5, None),                  # every token is out: nothing to resume
])
def test_resume_point(prompt, output, max_tokens, expected):
    assert resume_point(prompt, output, max_tokens) == expected


def test_attempt_ids_and_route_waits():
    assert attempt_id("cmpl-1", 0) == "cmpl-1" and attempt_id("cmpl-1", 2) == "cmpl-1-resume2"
    waits = route_waits(3.0)
    assert sum(waits) == pytest.approx(3.0) and waits[:4] == [0.1, 0.2, 0.5, 1.0]
    assert all(w > 0 for w in waits)


# ---- the stream --------------------------------------------------------------------------------------
def test_the_holder_is_the_worker_whose_events_went_furthest():
    stream = OutputStream("r")
    stream.feed(ev(0, 10), "prefill")
    assert stream.holder == "prefill"
    stream.feed(ev(1, 11, 12), "decode")
    stream.feed(ev(0, 10), "prefill")                    # a repeat does not move it back
    assert stream.holder == "decode" and stream.token_ids == [10, 11, 12]


def test_a_new_attempt_continues_at_the_offset_and_drops_the_old_ones_events():
    sink = TokenSink()
    stream = sink.open("r")
    stream.feed(ev(0, 10, 11), "d1")
    stream.feed(ev(3, 13), "d1")                         # early: held, then dropped by the new attempt
    sink.attach("r-resume1", stream)
    stream.start_attempt("r-resume1", "p")
    stream.feed(ev(2, 12, 13, rid="r-resume1"), "p")
    stream.feed(ev(4, 99, rid="r"), "d1")                # a late event of the retired attempt
    stream.feed(ev(4, 14, finish="length", rid="r-resume1"), "d2")
    assert stream.token_ids == [10, 11, 12, 13, 14] and stream.finished and stream.holder == "d2"
    sink.close("r")
    assert sink.streams == {}, "closing a request forgets every attempt id"


def test_a_resume_event_is_a_lost_delta_at_once():
    stream = OutputStream("r")
    stream.feed(ev(0, 10), "d1")
    stream.feed(ev(5, finish="resume"), "d1")
    deltas = [stream._queue.get_nowait() for _ in range(stream._queue.qsize())]
    assert deltas[-1].lost == Lost("worker_stopping", "r", "d1") and not stream.finished


async def test_a_push_stream_that_ends_loses_the_requests_of_a_dead_worker_only():
    sink = TokenSink()
    alive = {"d1": False, "d2": True}
    watch = WorkerWatch(sink, FakeChannels(alive))
    sink.on_push_ended = watch.push_ended
    a, b = sink.open("a"), sink.open("b")

    async def batches(worker: str, rid: str):
        yield token_sink_pb2.TokenBatch(events=[ev(0, 1, rid=rid)], worker_address=worker)

    await sink.Push(batches("d1", "a"), None)
    await sink.Push(batches("d2", "b"), None)           # ended too, but d2 answers: a reconnect
    await asyncio.sleep(0.05)
    assert [d.lost for d in drain(a)][-1] == Lost("worker_lost", "a", "d1")
    assert all(d.lost is None for d in drain(b))


def drain(stream: OutputStream):
    return [stream._queue.get_nowait() for _ in range(stream._queue.qsize())]


class FakeChannels:
    """`channels(address)` whose Stats answers where `alive[address]`."""

    def __init__(self, alive: dict[str, bool]) -> None:
        self.alive = alive

    def __call__(self, address: str):
        alive = self.alive

        class Channel:
            def unary_unary(self, method, **_):
                async def call(request, timeout=None):
                    if not alive.get(address, True):
                        raise unavailable("connection refused")
                    return worker_pb2.WorkerStats()
                return call

            def stream_stream(self, method, **_):
                return None                         # PushKV: not used by the gateway
        return Channel()


def unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=details)


# ---- a Generation that loses its workers ---------------------------------------------------------------
class Cluster:
    """Routes to prefill p<n> / decode d<n> (n counts the routes); each Prefill sends two tokens, then its
    decode worker 'dies' (the sink hears of it) until `finish_on` attempts, whose Prefill finishes the
    request. Records every Prefill and Route."""

    def __init__(self, sink: TokenSink, finish_on: int) -> None:
        self.sink, self.finish_on = sink, finish_on
        self.routes: list = []
        self.prefills: list[worker_pb2.PrefillRequest] = []
        self.aborted: list[tuple[str, str]] = []
        self.dead: set[str] = set()

    async def route(self, request):
        self.routes.append(request)
        n = len(self.routes)
        return (common_pb2.Instance(instance_id=f"p{n}", address=f"p{n}:1"),
                common_pb2.Instance(instance_id=f"d{n}", address=f"d{n}:1"))

    def instance_id_at(self, address: str) -> str:
        return address.split(":")[0]

    def __call__(self, address: str):
        cluster = self

        class Channel:
            def unary_unary(self, method, **_):
                name = method.rsplit("/", 1)[1]
                return lambda request, timeout=None: getattr(cluster, name)(address, request)

            def stream_stream(self, method, **_):
                return None
        return Channel()

    async def Prefill(self, address, request):
        self.prefills.append(request)
        stream = self.sink.streams[request.request_id]
        n, start = len(self.prefills), request.output_offset
        decode = f"d{n}:1"
        stream.feed(token_sink_pb2.TokenEvent(request_id=request.request_id, index=start, token_ids=[start]),
                    address)
        last = n == self.finish_on
        stream.feed(token_sink_pb2.TokenEvent(request_id=request.request_id, index=start + 1, token_ids=[start + 1],
                                              finish_reason="length" if last else ""), decode)
        if not last:
            self.dead.add(decode)
            asyncio.get_running_loop().call_soon(stream.lose, Lost("worker_lost", request.request_id, decode))
        return worker_pb2.PrefillReply(handed_off=True)

    async def Stats(self, address, request):
        if address in self.dead:
            raise unavailable("gone")
        return worker_pb2.WorkerStats()

    async def Abort(self, address, request):
        self.aborted.append((address, request.request_id))
        return worker_pb2.AbortReply()


def generation(sink: TokenSink, cluster: Cluster, metrics: GatewayMetrics, max_tokens: int) -> Generation:
    plan = Plan("m", [100, 101], common_pb2.SamplingOptions(max_tokens=max_tokens), (), 16)
    return Generation(plan, prefix="cmpl", sink=sink, sink_address="gw:1", scheduler=cluster, channels=cluster,
                      tokenizer=FakeTokenizer(), token_timeout_s=5, metrics=metrics)


async def test_a_request_resumes_from_its_output_and_the_client_sees_every_token_once():
    sink, metrics = TokenSink(), GatewayMetrics()
    cluster = Cluster(sink, finish_on=3)
    gen = generation(sink, cluster, metrics, max_tokens=6)
    await gen.start()
    events = [e async for e in gen.events()]
    assert "".join(t for t, _ in events) == "abcdef" and events[-1][1] == "length"
    _, second, third = cluster.prefills
    assert (list(second.prompt_token_ids), second.output_offset, second.sampling.max_tokens) == ([100, 101, 0, 1], 2, 4)
    assert (list(third.prompt_token_ids), third.output_offset, third.sampling.max_tokens) == (
        [100, 101, 0, 1, 2, 3], 4, 2)
    assert [p.request_id for p in cluster.prefills] == [gen.request_id, f"{gen.request_id}-resume1",
                                                        f"{gen.request_id}-resume2"]
    assert list(cluster.routes[2].exclude_instance_ids) == ["d1", "d2"], "lost instances are never routed to again"
    assert gen.num_resumes == 2 and gen.num_output_tokens == 6
    assert metrics.resumes.labels("worker_lost")._value.get() == 2
    await asyncio.sleep(0.01)
    assert ("d1:1", gen.request_id) in cluster.aborted, "the lost attempt is aborted where it ran"


async def test_a_request_that_keeps_losing_workers_ends_with_a_clear_error():
    sink, metrics = TokenSink(), GatewayMetrics()
    cluster = Cluster(sink, finish_on=99)
    gen = generation(sink, cluster, metrics, max_tokens=50)
    await gen.start()
    with pytest.raises(GenerationError) as info:
        async for _ in gen.events():
            pass
    assert info.value.status == 503 and "lost its worker" in str(info.value)
    assert len(cluster.prefills) == MAX_RESUMES + 1
    assert metrics.resumes_exhausted._value.get() == 1


async def test_a_prefill_that_fails_unavailable_before_the_first_token_is_routed_again():
    sink, metrics = TokenSink(), GatewayMetrics()
    cluster = Cluster(sink, finish_on=1)
    calls = []
    prefill = cluster.Prefill

    async def failing_first(address, request):
        calls.append(address)
        if len(calls) == 1:
            cluster.dead.add(address)                   # the prefill worker died: it does not answer
            raise unavailable("Socket closed")
        return await prefill(address, request)

    cluster.Prefill = failing_first
    gen = generation(sink, cluster, metrics, max_tokens=2)
    await gen.start()
    events = [e async for e in gen.events()]
    assert "".join(t for t, _ in events) == "ab" and events[-1][1] == "length"
    assert calls == ["p1:1", "p2:1"] and list(cluster.routes[1].exclude_instance_ids) == ["p1"]
    assert cluster.prefills[0].output_offset == 0 and list(cluster.prefills[0].prompt_token_ids) == [100, 101]
    assert metrics.resumes.labels("prefill_failed")._value.get() == 1
