"""KV payloads on a `Worker.PushKV` stream: stages of one header chunk then data chunks (≤ 4 MiB).

    stage 1: [header_json | data ≤4 MiB] [data] ... [data, end_of_stage]     blocks 0..k   (not final)
    stage 2: [header_json, end_of_stage]   ...                                 blocks k..n   (final)

The sender keeps one stream per request and feeds it stages as the prefill produces full blocks, so
the transfer overlaps with later prefill chunks; the receiver imports each stage as it completes.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

from services.engine.kv_transfer import MAX_CHUNK_BYTES, KVPayload
from services.gen.ferry.v1 import worker_pb2 as pb

# Data bytes per message. Any size up to MAX_CHUNK_BYTES is valid on the wire; 1 MiB moves KV fastest
# through grpcio on loopback (bench/kv_transfer.py: sender + receiver ~1.35 CPU-s/GB at 1 MiB, ~1.5 at
# 2 MiB, ~1.7 at 4 MiB and 512 KiB), since the copies grpcio and protobuf make of each message then
# stay in the CPU cache.
CHUNK_BYTES = 2**20
assert CHUNK_BYTES <= MAX_CHUNK_BYTES


def stage_chunks(payload: KVPayload, max_bytes: int = CHUNK_BYTES) -> Iterator[pb.KVChunk]:
    """One stage's messages, made one at a time as gRPC asks for them (never a second copy of the
    whole payload: each chunk's bytes are freed once sent, and malloc hands them to the next)."""
    rid = payload.request_id
    header = json.dumps(payload.meta())
    last = max(1, -(-len(payload.data) // max_bytes)) - 1
    for i, data in enumerate(payload.chunks(max_bytes) if payload.data else [b""]):
        yield pb.KVChunk(request_id=rid, header_json=header if i == 0 else "", data=data,
                         end_of_stage=i == last)


class StageError(ValueError):
    """A malformed stage, with the request id its stream named (so the receiver can release it even
    when no stage of it ever parsed)."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


async def read_stages(chunks: AsyncIterator[pb.KVChunk]) -> AsyncIterator[KVPayload]:
    """Payloads from a PushKV stream; StageError (a ValueError) on a malformed stage, saying what was wrong.

    A stage's bytes are appended to one buffer as its chunks arrive (each chunk's copy is freed at
    once), and `KVPayload.from_chunks` takes that buffer as is: one stage in memory, not two."""
    meta: dict | None = None
    data = bytearray()
    request_id = ""
    try:
        async for chunk in chunks:
            if request_id and chunk.request_id and chunk.request_id != request_id:
                raise ValueError(f"one PushKV stream carries one request: got {chunk.request_id!r} "
                                 f"after {request_id!r}")
            request_id = request_id or chunk.request_id
            if meta is None:
                meta = _header(chunk.header_json)
            data += chunk.data
            if chunk.end_of_stage:
                stage = [meta, data]
                meta, data = None, bytearray()
                yield _payload(stage, request_id)
        if meta is not None:
            raise ValueError("the PushKV stream ended in the middle of a stage")
    except ValueError as e:
        raise StageError(str(e), request_id) from None


def _header(header_json: str) -> dict:
    if not header_json:
        raise ValueError("a KV stage must start with a header chunk (header_json)")
    try:
        meta = json.loads(header_json)
    except (ValueError, RecursionError) as e:       # JSONDecodeError, a 5000-digit int, [[[[...
        raise ValueError(f"KV stage header is not valid JSON: {e!r}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"KV stage header must be a JSON object, got {type(meta).__name__}")  # noqa: TRY004
    return meta


def _payload(stage: list, request_id: str) -> KVPayload:
    """The stage's payload, taking its parts out of `stage`: the caller then holds the only reference
    to its bytes, so they are freed when it drops the payload — not when the next stage arrives.
    (Freeing a stage of hundreds of MB takes ms; a migration's stop-and-copy must not wait for it.)"""
    meta, data = stage
    stage.clear()
    payload = KVPayload.from_chunks(meta, [data])
    if payload.request_id != request_id:
        raise ValueError(f"stage header names {payload.request_id!r}, the stream {request_id!r}")
    return payload


class StageQueue:
    """Stages of one request waiting to go out on its PushKV stream; `None` ends the stream."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[KVPayload | None] = asyncio.Queue()

    def put(self, payload: KVPayload | None) -> None:
        self._queue.put_nowait(payload)

    async def chunks(self) -> AsyncIterator[pb.KVChunk]:
        while (payload := await self._queue.get()) is not None:
            final, chunks = payload.is_final, stage_chunks(payload)
            del payload             # once sent, a stage's bytes are freed at once (not when the next one comes)
            for chunk in chunks:
                yield chunk
            if final:
                return
