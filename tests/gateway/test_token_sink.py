"""`OutputStream` puts a request's token events in order: early ones wait, repeats are dropped, overlaps
are trimmed, an error ends the stream; `TokenSink.Push` routes events by request id."""
from __future__ import annotations

import asyncio

import pytest

from services.gateway.token_sink import OutputStream, TokenDelta, TokenSink
from services.gen.ferry.v1 import token_sink_pb2 as pb


def ev(index: int, *tokens: int, finish: str = "", error: str = "", rid: str = "r") -> pb.TokenEvent:
    return pb.TokenEvent(request_id=rid, index=index, token_ids=tokens, finish_reason=finish, error=error)


def drain(stream: OutputStream) -> list[TokenDelta]:
    out = []
    while not stream._queue.empty():
        out.append(stream._queue.get_nowait())
    return out


def tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def run(*events: pb.TokenEvent) -> list[TokenDelta]:
    stream = OutputStream()
    for e in events:
        stream.feed(e)
    return drain(stream)


# (id, events in arrival order, tokens emitted, finish_reason of the last delta)
ORDER_CASES = [
    ("in-order", [ev(0, 10), ev(1, 11), ev(2, 12, finish="length")], [10, 11, 12], "length"),
    ("first-token-last", [ev(1, 11), ev(2, 12), ev(3, 13), ev(0, 10)], [10, 11, 12, 13], None),
    ("early-final-waits", [ev(2, 12, finish="stop"), ev(0, 10), ev(1, 11)], [10, 11, 12], "stop"),
    ("repeat-dropped", [ev(0, 10), ev(1, 11), ev(1, 11), ev(0, 10), ev(2, 12)], [10, 11, 12], None),
    ("repeat-of-early", [ev(2, 12), ev(2, 12), ev(0, 10), ev(1, 11)], [10, 11, 12], None),
    ("overlap-trimmed", [ev(0, 10, 11, 12), ev(1, 11, 12, 13, 14)], [10, 11, 12, 13, 14], None),
    ("early-overlap-trimmed", [ev(3, 13, 14), ev(0, 10, 11, 12, 13)], [10, 11, 12, 13, 14], None),
    ("resend-with-finish", [ev(0, 10, 11), ev(0, 10, 11, 12, finish="length")], [10, 11, 12], "length"),
    ("multi-token-batches", [ev(4, 14, 15), ev(0, 10, 11), ev(2, 12, 13)], [10, 11, 12, 13, 14, 15], None),
]


@pytest.mark.parametrize("events,expected,finish", [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES])
def test_events_come_out_in_order_exactly_once(events, expected, finish):
    deltas = run(*events)
    assert tokens(deltas) == expected
    assert deltas[-1].finish_reason == finish
    assert all(d.finish_reason is None for d in deltas[:-1]), "only the last delta finishes"


def test_nothing_comes_out_while_the_first_token_is_missing():
    assert run(ev(1, 11), ev(2, 12, finish="length")) == []


def test_nothing_after_the_finish():
    deltas = run(ev(0, 10, finish="stop"), ev(1, 11), ev(1, 11, finish="length"), ev(0, error="late", finish="error"))
    assert tokens(deltas) == [10] and [d.finish_reason for d in deltas] == ["stop"]


def test_an_error_ends_the_stream_at_once_whatever_its_index():
    deltas = run(ev(0, 10), ev(5, error="decode worker died", finish="error"), ev(1, 11))
    assert tokens(deltas) == [10]
    assert deltas[-1] == TokenDelta((), "error", error="decode worker died")
    assert run(ev(3, 13), ev(0, finish="error"))[-1].error == "worker error", "an error without text says so"


def test_fail_ends_the_stream_once():
    stream = OutputStream()
    stream.feed(ev(0, 10))
    stream.fail("no token for 120 s")
    stream.fail("again")
    stream.feed(ev(1, 11))
    assert [(d.token_ids, d.finish_reason, d.error) for d in drain(stream)] == [
        ((10,), None, None), ((), "error", "no token for 120 s")]


async def test_next_waits_for_a_token_or_times_out():
    stream = OutputStream()
    with pytest.raises(TimeoutError):
        await stream.next(0.05)
    asyncio.get_running_loop().call_later(0.02, stream.feed, ev(0, 10))
    assert (await stream.next(1)).token_ids == (10,)


async def test_sink_routes_events_by_request_and_ignores_unknown_ones():
    sink = TokenSink()
    a, b = sink.open("a"), sink.open("b")

    async def batches():
        yield pb.TokenBatch(events=[ev(0, 1, rid="a"), ev(0, 2, rid="b"), ev(0, 3, rid="gone")])
        yield pb.TokenBatch(events=[ev(1, 4, rid="a", finish="length")])

    assert await sink.Push(batches(), None) == pb.PushReply()
    assert tokens(drain(a)) == [1, 4] and tokens(drain(b)) == [2]
    sink.close("a")
    sink.close("a")
    assert list(sink.streams) == ["b"]


async def test_tokens_nobody_waits_for_are_reported_once_per_request_with_their_worker():
    told: list[tuple[str, list[str]]] = []
    sink = TokenSink(on_unknown=lambda address, ids: told.append((address, ids)))
    sink.open("a")

    async def batches():
        yield pb.TokenBatch(events=[ev(0, 1, rid="a"), ev(0, 2, rid="old"), ev(1, 3, rid="old")],
                            worker_address="w1:1")
        yield pb.TokenBatch(events=[ev(2, 4, rid="old"), ev(0, 5, rid="other")], worker_address="w1:1")
        yield pb.TokenBatch(events=[ev(0, 6, rid="anon")])           # no worker address: nobody to tell

    await sink.Push(batches(), None)
    assert told == [("w1:1", ["old"]), ("w1:1", ["other"])]


async def test_a_cancel_that_comes_with_a_token_cancels_next():
    """A client that leaves cancels the task reading its stream; a token queued in the same loop turn
    must not swallow the cancel (asyncio.wait_for does that on Python 3.11: the request then ran on
    the workers to max_tokens after its non-streaming client had gone)."""
    stream = OutputStream()
    reader = asyncio.create_task(stream.next(60))
    await asyncio.sleep(0)                          # the reader waits on the queue
    stream.feed(ev(0, 10))
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert tokens(drain(stream)) == [10], "the token stays queued"
