"""Live migration of one decoding request to another decode worker (Llumnix), driven by the source.

    Admit(reserve) on the destination ──(refused: nothing happened)
    stage 0:   every full block, while the request keeps decoding here       ─┐ one PushKV stream,
    stage k:   the full blocks added meanwhile (each stage in 32 MiB pieces)   │ one ack per piece
    stop-and-copy (fewer than `stop_copy_blocks` new blocks, or `max_stages`): │
               suspend here, send the rest + the request's state             ─┘
    ack resumed=true ──▶ free the request here (its tokens now come from the destination)

Any failure before that last ack (the destination refuses, dies, times out; the request finishes,
is preempted or aborted here) leaves the request running here: a suspended request is resumed, and
the destination is told to drop what it received. The gateway orders tokens by index, so a token
both workers emit around the hand-over is shown once.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from services.engine.engine import BaseEngine, KVExport
from services.engine.kv_transfer import KVPayload
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
from services.worker.kv_stream import StageQueue

DEFAULT_MAX_STAGES = 4
DEFAULT_STOP_COPY_BLOCKS = 1      # the stop-and-copy takes only the partial last block (pre-copy caught up)
PIECE_BYTES = 32 * 2**20          # a pre-copy round goes out in pieces of this size
STAGE_TIMEOUT_S = 60.0            # a pre-copy stage the destination does not acknowledge in time
STOP_COPY_TIMEOUT_S = 10.0        # the request is paused meanwhile: fail fast and resume it here


class MigrationFailed(Exception):
    """Why a migration did not happen; the request is running on the source again."""


@dataclass
class Progress:
    request_id: str
    num_preemptions: int              # the request's count when the migration began (a change = recompute)
    sent_blocks: int = 0
    num_stages: int = 0
    num_bytes: int = 0
    suspended_at: float = 0.0         # perf_counter when the request stopped decoding here
    started: float = field(default_factory=time.perf_counter)


def ready_blocks(engine: BaseEngine, progress: Progress) -> int:
    """On the engine thread: how many of the request's blocks are full and final here (never its last
    block, which is still filling). MigrationFailed once the request ended or was preempted."""
    seq = _still_decoding(engine, progress)
    bs = engine.layout.block_size
    return min(seq.num_computed_tokens // bs, -(-seq.num_computed_tokens // bs) - 1)


def export_blocks(engine: BaseEngine, progress: Progress, end: int) -> KVExport:
    """On the engine thread: plan the export of blocks [sent, end); the bytes are read off the engine
    thread (`KVExport.read`), so decoding goes on meanwhile."""
    _still_decoding(engine, progress)
    return engine.plan_export(progress.request_id, slice(progress.sent_blocks, end))


def export_final(engine: BaseEngine, progress: Progress) -> KVExport:
    """On the engine thread: suspend the request (its last step has ended) and plan the rest."""
    _still_decoding(engine, progress)
    engine.suspend(progress.request_id)
    progress.suspended_at = time.perf_counter()
    return engine.plan_export(progress.request_id, slice(progress.sent_blocks, None))


def _still_decoding(engine: BaseEngine, progress: Progress):
    seq = engine.seqs.get(progress.request_id)
    if seq is None:
        raise MigrationFailed(f"{progress.request_id} finished or was aborted during the migration")
    if seq.num_preemptions != progress.num_preemptions or seq.is_prefilling:
        raise MigrationFailed(f"{progress.request_id} was preempted on the source during the migration")
    return seq


def resume_if_suspended(engine: BaseEngine, rid: str) -> None:
    if engine.is_suspended(rid):
        engine.resume(rid)


def decoding_state(engine: BaseEngine, rid: str) -> tuple[int, int]:
    """(blocks held, preemptions so far) of a decoding request; MigrationFailed otherwise."""
    seq = engine.seqs.get(rid)
    if seq is None or seq.is_prefilling or seq not in engine.scheduler.running:
        raise MigrationFailed(f"{rid} is not decoding here (only decoding requests migrate)")
    return len(seq.block_ids), seq.num_preemptions


async def migrate(loop, stub: worker_pb2_grpc.WorkerStub, request: worker_pb2.MigrateRequest,
                  admit: worker_pb2.AdmitRequest) -> worker_pb2.MigrateReply:
    """Run one migration (see the module docstring) and return its figures; raises MigrationFailed
    with the request running here again. `loop` is the source's EngineLoop; `admit` carries the
    sink and the priority. The caller frees the request here after a success."""
    rid = request.request_id
    max_stages = request.max_stages or DEFAULT_MAX_STAGES
    stop_copy_blocks = request.stop_copy_blocks or DEFAULT_STOP_COPY_BLOCKS
    num_blocks, num_preemptions = await loop.call(decoding_state, rid)
    admit.reserve_blocks = num_blocks + stop_copy_blocks + 1     # + what it may fill meanwhile
    try:
        await stub.Admit(admit, timeout=10)
    except grpc.aio.AioRpcError as e:
        raise MigrationFailed(f"the destination refused {rid}: {e.code().name}: {e.details()}") from None
    progress = Progress(rid, num_preemptions)
    stages = StageQueue()
    call = stub.PushKV(stages.chunks())
    acks = call.__aiter__()
    piece = max(1, PIECE_BYTES // loop.engine.layout.bytes_per_block)
    try:
        while progress.num_stages < max_stages - 1:          # pre-copy rounds
            ready = await loop.call(ready_blocks, progress)
            if ready - progress.sent_blocks < (stop_copy_blocks if progress.num_stages else 1):
                break                                       # little left: the stop-and-copy takes it
            while progress.sent_blocks < ready:             # in pieces, so no copy holds things up long
                planned = await loop.call(export_blocks, progress, min(ready, progress.sent_blocks + piece))
                payload = await asyncio.to_thread(planned.read, loop.engine)
                await _send(progress, payload, stages, acks, STAGE_TIMEOUT_S)
                del payload         # free its bytes now, not during the stop-and-copy
            progress.num_stages += 1
        planned = await loop.call(export_final, progress)
        await _send(progress, planned.read(loop.engine), stages, acks, STOP_COPY_TIMEOUT_S)
        progress.num_stages += 1
        now = time.perf_counter()
        return worker_pb2.MigrateReply(migrated=True, num_stages=progress.num_stages,
                                       num_blocks=progress.sent_blocks, num_bytes=progress.num_bytes,
                                       downtime_s=now - progress.suspended_at, duration_s=now - progress.started)
    except BaseException as e:
        call.cancel()
        await asyncio.shield(_undo(loop, stub, rid))
        if isinstance(e, grpc.aio.AioRpcError):
            raise MigrationFailed(f"KV transfer of {rid} failed: {e.code().name}: {e.details()}") from None
        if isinstance(e, (TimeoutError, StopAsyncIteration)):
            raise MigrationFailed(f"the destination did not acknowledge a stage of {rid}") from None
        raise


async def _send(progress: Progress, payload: KVPayload, stages: StageQueue, acks, timeout: float) -> None:
    stages.put(payload)
    async with asyncio.timeout(timeout):        # not wait_for: on 3.11 it can swallow a cancel
        ack = await acks.__anext__()
    progress.sent_blocks += payload.num_blocks
    progress.num_bytes += len(payload.data)
    if ack.num_blocks != progress.sent_blocks:
        raise MigrationFailed(f"{progress.request_id}: the destination has {ack.num_blocks} blocks, "
                              f"{progress.sent_blocks} were sent")
    if payload.is_final and not ack.resumed:
        raise MigrationFailed(f"{progress.request_id}: the destination did not resume it")


async def _undo(loop, stub: worker_pb2_grpc.WorkerStub, rid: str) -> None:
    """Back to the start: running here, nothing left on the destination (best effort there)."""
    await loop.call(resume_if_suspended, rid)
    try:
        await stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=5)
    except grpc.aio.AioRpcError:
        pass                          # it died or is unreachable: its admission expires on its own
