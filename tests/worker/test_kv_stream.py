"""PushKV stream framing (services/worker/kv_stream.py): real `KVPayload`s with random KV bytes go
through `stage_chunks` and come back from `read_stages` identical; malformed streams are a ValueError
that says what is wrong."""
from __future__ import annotations

import json
import os

import pytest

from services.engine.kv_transfer import KVLayout, KVPayload
from services.engine.sampling import SamplingParams
from services.gen.ferry.v1 import worker_pb2 as pb
from services.worker.kv_stream import StageQueue, read_stages, stage_chunks

LAYOUT = KVLayout("SmolLM2-135M-Instruct", "float32", 16, 2, 3, 8)         # 12 KiB blocks
PARAMS = SamplingParams(max_tokens=20, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=("\n", "END"),
                        stop_token_ids=(2,), ignore_eos=True)


def payload(first_block: int = 0, num_blocks: int = 3, rid: str = "req-1", computed: int = 40) -> KVPayload:
    """Blocks of a request with a 40-token prompt and one sampled token (3 blocks hold its KV)."""
    token_ids = tuple(range(1000, 1041))
    num_full = min(first_block + num_blocks, computed // LAYOUT.block_size)
    keys = tuple(os.urandom(16).hex() for _ in range(first_block, num_full))
    return KVPayload(layout=LAYOUT, request_id=rid, token_ids=token_ids, num_prompt_tokens=40,
                     num_computed_tokens=computed, params=PARAMS, seed=1234, first_block=first_block,
                     num_blocks=num_blocks, block_keys=keys, data=os.urandom(num_blocks * LAYOUT.bytes_per_block))


async def aiter(chunks):
    for c in chunks:
        yield c


async def read_all(chunks) -> list[KVPayload]:
    return [p async for p in read_stages(aiter(chunks))]


@pytest.mark.parametrize("max_bytes", [10**9, LAYOUT.bytes_per_block, 5000, 4096 * 3 + 1])
async def test_one_stage_round_trip(max_bytes):
    p = payload()
    chunks = list(stage_chunks(p, max_bytes))
    assert len(chunks) == -(-len(p.data) // max_bytes)
    assert all(len(c.data) <= max_bytes for c in chunks)
    assert chunks[0].header_json and not any(c.header_json for c in chunks[1:])
    assert [c.end_of_stage for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {c.request_id for c in chunks} == {"req-1"}
    assert await read_all(chunks) == [p]


async def test_stages_of_one_request_arrive_in_order():
    stages = [payload(0, 1), payload(1, 1), payload(2, 1)]
    assert [s.is_final for s in stages] == [False, False, True]
    chunks = [c for s in stages for c in stage_chunks(s, 5000)]
    got = await read_all(chunks)
    assert got == stages
    assert got[-1].params == PARAMS and got[-1].block_keys == stages[-1].block_keys


async def test_a_stage_without_blocks_is_one_header_chunk():
    p = payload(3, 0, computed=40)     # nothing left to send: a final stage carrying only the state
    chunks = list(stage_chunks(p))
    assert len(chunks) == 1 and chunks[0].end_of_stage and chunks[0].data == b""
    assert await read_all(chunks) == [p]


async def test_stage_queue_streams_until_the_final_stage():
    queue = StageQueue()
    stages = [payload(0, 2), payload(2, 1)]
    for s in stages:
        queue.put(s)
    queue.put(payload(0, 1, rid="never-sent"))           # after the final stage: not read
    assert [p async for p in read_stages(queue.chunks())] == stages
    queue = StageQueue()
    queue.put(payload(0, 1))
    queue.put(None)                                       # the sender gave up: the stream ends early
    got = [p async for p in read_stages(queue.chunks())]
    assert len(got) == 1 and not got[0].is_final, "the receiver sees no final stage"


async def test_empty_stream_yields_nothing():
    assert await read_all([]) == []


def chunks_of(p: KVPayload, max_bytes: int = 5000) -> list[pb.KVChunk]:
    return list(stage_chunks(p, max_bytes))


def with_header(chunks: list[pb.KVChunk], header: str) -> list[pb.KVChunk]:
    first = pb.KVChunk()
    first.CopyFrom(chunks[0])
    first.header_json = header
    return [first, *chunks[1:]]


def meta(**changes) -> str:
    m = payload().meta()
    for key, value in changes.items():
        if value is ...:
            m.pop(key)
        else:
            m[key] = value
    return json.dumps(m)


def malformed_cases():
    p = payload()
    c = chunks_of(p)
    other = chunks_of(payload(rid="req-2"))
    return [
        ("no-header", c[1:], "header"),
        ("header-not-json", with_header(c, "{not json"), "not valid JSON"),
        ("header-not-object", with_header(c, "[1, 2]"), "JSON object"),
        ("header-null", with_header(c, "null"), "JSON object"),
        ("ends-mid-stage", c[:-1], "middle of a stage"),
        ("truncated", c[:2] + c[3:], "truncated"),
        ("too-long", c[:-1] + [pb.KVChunk(request_id="req-1", data=b"x" * 8)] + c[-1:], "too long"),
        ("two-requests", c + other, "one request"),
        ("header-names-another-request", with_header(c, meta(request_id="req-2")), "names 'req-2'"),
        ("header-missing-field", with_header(c, meta(num_blocks=...)), "malformed"),
        ("header-unknown-field", with_header(c, meta(colour="blue")), "malformed"),
        ("header-bad-layout", with_header(c, meta(layout={"model_id": "m"})), "malformed"),
        ("header-unknown-dtype", with_header(c, meta(layout={**p.meta()["layout"], "dtype": "float64"})),
         "malformed"),
        ("header-bad-params", with_header(c, meta(params={**p.meta()["params"], "max_tokens": 0})), "max_tokens"),
        ("blocks-beyond-the-kv", with_header(c, meta(first_block=2)), "outside"),
        ("computed-beyond-tokens", with_header(c, meta(num_computed_tokens=41)), "num_computed_tokens"),
    ]


@pytest.mark.parametrize("chunks,word", [m[1:] for m in malformed_cases()], ids=[m[0] for m in malformed_cases()])
async def test_malformed_stream_is_a_value_error_that_says_what(chunks, word):
    with pytest.raises(ValueError) as info:
        await read_all(chunks)
    assert word in str(info.value)


async def test_stages_before_a_malformed_one_are_still_delivered():
    good, bad = payload(0, 1), chunks_of(payload(1, 2))[:-1]       # the second stage never ends
    got = []
    with pytest.raises(ValueError, match="middle of a stage"):
        async for p in read_stages(aiter(chunks_of(good) + bad)):
            got.append(p)
    assert got == [good]
