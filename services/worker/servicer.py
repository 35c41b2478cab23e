"""`WorkerServicer`: the gRPC face of one engine, for the prefill role, the decode role, or both.

    Prefill  -> (prefill role) Admit on the decode worker, prefix from the kvstore, add to the engine;
                stages stream to the decode worker while the prompt computes (see handoff.py);
                returns when the first token is out and the KV handed off.
    Admit    -> (decode role) remember where the request's tokens go.
    PushKV   -> (decode role) import stages; the request resumes decoding after the final one.
    Migrate  -> (decode role) live-migrate a decoding request to another decode worker (migration.py).
    Abort / Drain / Stats.
    SetPowerCap -> hand the scheduler's power cap to the GPU backend (power.py; read-only unless allowed).

Tokens of every request this worker runs go to its gateway's TokenSink, one batch per step.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc
import torch

from services.common import failpoints
from services.common.block_keys import chain_keys
from services.common.grpc_util import aio_channel
from services.engine.block_pool import OutOfBlocks
from services.engine.engine import BaseEngine, RequestOutput
from services.engine.kv_transfer import KVLayoutMismatch
from services.gen.ferry.v1 import common_pb2, token_sink_pb2, worker_pb2, worker_pb2_grpc
from services.kvstore.client import KVStoreClient
from services.worker.checkpoint import take_checkpoints
from services.worker.engine_loop import EngineLoop
from services.worker.handoff import StepResult, Tracked, after_step
from services.worker.kv_stream import StageQueue, read_stages
from services.worker.metrics import WorkerMetrics
from services.worker.migration import MigrationFailed, migrate
from services.worker.power import GpuBackend, PowerControl
from services.worker.requests import sampling_params, validate_prefill
from services.worker.token_pusher import TokenPusher

log = logging.getLogger(__name__)
ADMIT_TIMEOUT_S = 600.0          # an admitted request with no KV after this long is dropped
KV_ROOM_WAIT_S = 30.0            # a KV stage that finds no free blocks waits this long for some
KV_ROOM_POLL_S = 0.02
MOVED_MEMORY = 10_000            # migrated-away request ids remembered, to forward a late Abort
PHASES = {"waiting": common_pb2.REQUEST_PHASE_WAITING, "prefilling": common_pb2.REQUEST_PHASE_PREFILLING,
          "decoding": common_pb2.REQUEST_PHASE_DECODING, "suspended": common_pb2.REQUEST_PHASE_MIGRATING,
          "arriving": common_pb2.REQUEST_PHASE_ARRIVING}


@dataclass(eq=False)
class Flight:
    """Event-loop side of a request: the Prefill RPC waiting on it and its KV stream."""
    tracked: Tracked
    prefill_done: asyncio.Future
    num_cached_tokens: int = 0
    decode_address: str = ""
    kv_started: bool = False             # decode role: the first KV stage arrived
    stages: StageQueue | None = None
    sender: asyncio.Task | None = None
    waiting_tokens: int = 0              # decode role: a stage waits here for free KV blocks
    kv_bytes: int = 0                    # KV bytes sent (prefill role) or received (decode role) so far
    kv_started_at: float = 0.0           # perf_counter of the first KV stage


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: BaseEngine, *, instance_id: str, role: int,
                 kvstore: KVStoreClient | None, address: str = "") -> None:
        self.engine = engine
        self.instance_id = instance_id
        self.role = role
        self.address = address
        self.kvstore = kvstore
        self.namespace = "/".join(str(v) for v in (engine.layout.model_id, engine.layout.dtype,
                                                   engine.layout.block_size, engine.layout.num_layers,
                                                   engine.layout.num_kv_heads, engine.layout.head_dim))
        self.draining = False
        self.tracked: dict[str, Tracked] = {}       # read on the engine thread; changed between steps
        self.flights: dict[str, Flight] = {}
        self.migrations: dict[str, tuple[asyncio.Task, str]] = {}   # outgoing: request id -> (task, destination)
        self.moved: OrderedDict[str, str] = OrderedDict()       # request id -> where it migrated to
        self.pusher = TokenPusher(address)
        self.metrics = WorkerMetrics()
        self.gpu: GpuBackend | None = None          # the power backend, where the worker has one
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.loop = EngineLoop(engine, asyncio.get_running_loop(),
                               lambda eng, outs: after_step(eng, outs, self.tracked, self.kvstore is not None),
                               self._on_step, self._on_engine_failure)

    # ---- Prefill --------------------------------------------------------------------------
    async def Prefill(self, request: worker_pb2.PrefillRequest, context) -> worker_pb2.PrefillReply:
        rid = request.request_id
        problem = validate_prefill(request, self.role) or _bad_priority(request.priority)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.instance_id} is draining")
        if rid in self.flights:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is already running here")
        try:
            params = sampling_params(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        hand_off = bool(request.decode_address)
        prompt = list(request.prompt_token_ids)
        if len(prompt) + params.max_tokens > self.engine.max_model_len:     # before Admit: its num_tokens is a uint32
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                f"model's context of {self.engine.max_model_len} tokens")
        if hand_off:
            await self._admit_on(request.decode_address, worker_pb2.AdmitRequest(
                request_id=rid, sink_address=request.sink_address, num_tokens=len(prompt) + params.max_tokens,
                priority=request.priority, output_offset=request.output_offset), context)
        keys = chain_keys(prompt, self.engine.layout.block_size)[:(len(prompt) - 1) // self.engine.layout.block_size]
        num_store, fetched = await self._fetch_prefix(keys)
        tracked = Tracked(rid, request.sink_address, hand_off, priority=request.priority,
                          num_store_blocks=num_store, output_offset=request.output_offset)
        flight = Flight(tracked, asyncio.get_running_loop().create_future(),
                        decode_address=request.decode_address)
        self.flights[rid] = flight

        def start(engine: BaseEngine) -> int:
            if fetched is not None:
                engine.cache_blocks(keys[:len(fetched)], fetched)
            hits = engine.num_cached_prefix_blocks(keys)
            engine.add_request(rid, prompt, params)
            self.tracked[rid] = tracked
            return hits * engine.layout.block_size

        try:
            flight.num_cached_tokens = await self.loop.call(start)
            self.metrics.prefix_lookup(len(prompt), flight.num_cached_tokens)
            return await flight.prefill_done
        except ValueError as e:
            self._forget(rid)
            if hand_off:                        # the decode worker admitted it: don't leave it waiting there
                await self._abort_on(request.decode_address, rid)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except PrefillFailed as e:
            await context.abort(e.code, str(e))
        except asyncio.CancelledError:          # the gateway gave up on the request
            await self._abort(rid)
            raise

    async def _admit_on(self, address: str, admit: worker_pb2.AdmitRequest, context) -> None:
        stub = worker_pb2_grpc.WorkerStub(self._channel(address))
        try:
            await stub.Admit(admit, timeout=10)
        except grpc.aio.AioRpcError as e:
            code = e.code() if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"decode worker {address} did not admit {admit.request_id}: {e.details()}")

    async def _fetch_prefix(self, keys: list[bytes]) -> tuple[int, torch.Tensor | None]:
        """Blocks the kvstore has beyond this worker's own prefix cache: (store prefix length, data)."""
        if self.kvstore is None or not keys:
            return 0, None
        try:
            num_store = await self.kvstore.lookup(self.namespace, keys)
            num_local = await self.loop.call(lambda e: e.num_cached_prefix_blocks(keys))
            if num_store <= num_local:
                return num_store, None
            blocks = await self.kvstore.get(self.namespace, keys[:num_store])
        except grpc.aio.AioRpcError as e:       # the store is a cache: serve without it
            log.warning("kvstore unavailable (%s); computing the prefix", e.code().name)
            return 0, None
        size = self.engine.layout.bytes_per_block
        bad = next((i for i, block in enumerate(blocks) if len(block) != size), None)
        if bad is not None:     # not this layout's block (a buggy or hostile Put): a miss from there on
            log.warning("kvstore block %d of %d is %d bytes, not %d; computing the prefix from there",
                        bad, len(blocks), len(blocks[bad]), size)
            blocks = blocks[:bad]
        shape = self.engine.layout.block_shape
        dtype = torch.empty(0, dtype=getattr(torch, self.engine.layout.dtype)).dtype
        data = torch.frombuffer(bytearray(b"".join(blocks)), dtype=dtype).view(len(blocks), *shape) if blocks else None
        return len(blocks), data

    # ---- Admit / PushKV (decode role) -----------------------------------------------------
    async def Admit(self, request: worker_pb2.AdmitRequest, context) -> worker_pb2.AdmitReply:
        rid = request.request_id
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.instance_id} is draining")
        if not rid or not request.sink_address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Admit needs request_id and sink_address")
        if _bad_priority(request.priority):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _bad_priority(request.priority))
        if rid in self.flights:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is already here")
        blocks = -(-request.num_tokens // self.engine.layout.block_size)
        if blocks > self.engine.kv.pool.num_blocks:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{rid} can grow to {blocks} KV blocks; this worker has {self.engine.kv.pool.num_blocks}")
        if request.reserve_blocks:
            try:
                await self.loop.call(lambda e: e.reserve(rid, request.reserve_blocks))
            except (OutOfBlocks, ValueError) as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"cannot reserve {request.reserve_blocks} KV blocks for {rid}: {e}")
        flight = Flight(Tracked(rid, request.sink_address, hand_off=False, priority=request.priority,
                                output_offset=request.output_offset),
                        asyncio.get_running_loop().create_future())
        self.flights[rid] = flight
        asyncio.get_running_loop().call_later(ADMIT_TIMEOUT_S, self._expire_admission, flight)
        return worker_pb2.AdmitReply()

    def _expire_admission(self, flight: Flight) -> None:
        """An admitted request whose KV never came (its prefill worker died) must not stay forever."""
        rid = flight.tracked.request_id
        if self.flights.get(rid) is flight and not flight.kv_started:
            log.warning("%s: no KV arrived %.0f s after Admit; dropping it", rid, ADMIT_TIMEOUT_S)
            self._forget(rid)

    async def PushKV(self, request_iterator, context):
        rid, num_blocks, resumed = "", 0, False
        try:
            async for payload in read_stages(request_iterator):
                rid = payload.request_id
                flight = self.flights.get(rid)
                if flight is None:          # a stopping worker dropped it: the request resumes elsewhere
                    await context.abort(grpc.StatusCode.UNAVAILABLE if self.draining else
                                        grpc.StatusCode.FAILED_PRECONDITION,
                                        f"{rid} was not admitted here (call Admit first)")
                if not flight.kv_started:
                    flight.kv_started, flight.kv_started_at = True, time.perf_counter()
                flight.kv_bytes += len(payload.data)
                await failpoints.pause("pushkv.final" if payload.is_final else
                                       "pushkv.stage0" if payload.first_block == 0 else "")
                num_blocks += payload.num_blocks
                resumed = await self._import_when_room(payload, flight)
                del payload     # free a big stage's bytes before the ack, not while the next (final) stage waits
                yield worker_pb2.PushKVReply(resumed=resumed, num_blocks=num_blocks)
                if resumed:
                    self.metrics.kv_transfer("received", flight.kv_bytes, time.perf_counter() - flight.kv_started_at)
                    return
        except (ValueError, TypeError, KVLayoutMismatch) as e:
            await self._abort(rid or getattr(e, "request_id", ""))     # StageError: the stream's request
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except OutOfBlocks as e:
            await self._abort(rid)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except asyncio.CancelledError:
            await self._abort(rid)
            raise
        await self._abort(rid)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{rid}: the stream ended before the final stage")

    async def _import_when_room(self, payload, flight: Flight) -> bool:
        """Import a stage; when the pool has no room for it, wait (steps finish requests and free
        blocks) rather than refuse: the request is queued here, reported as waiting, and the
        scheduler's freeness and de-fragmentation see it. OutOfBlocks after KV_ROOM_WAIT_S."""
        deadline = asyncio.get_running_loop().time() + KV_ROOM_WAIT_S
        try:
            while True:
                try:
                    return await self.loop.call(self._import, payload, flight.tracked)
                except OutOfBlocks:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    flight.waiting_tokens = payload.num_blocks * self.engine.layout.block_size
                    await asyncio.sleep(KV_ROOM_POLL_S)
        finally:
            flight.waiting_tokens = 0

    def _import(self, engine: BaseEngine, payload, tracked: Tracked) -> bool:
        if payload.num_prompt_tokens + payload.params.max_tokens > engine.max_model_len:
            raise ValueError(f"{payload.request_id}: prompt ({payload.num_prompt_tokens} tokens) + max_tokens "
                             f"({payload.params.max_tokens}) exceeds the model's context of {engine.max_model_len}")
        resumed = engine.import_kv(payload)
        if resumed:
            self.tracked[payload.request_id] = tracked
        return resumed

    # ---- Migrate (decode role, source side) -----------------------------------------------
    async def Migrate(self, request: worker_pb2.MigrateRequest, context) -> worker_pb2.MigrateReply:
        rid, destination = request.request_id, request.destination_address
        if not rid or not destination:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Migrate needs request_id and destination_address")
        if destination == self.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{rid}: the destination is this worker")
        flight = self.flights.get(rid)
        if flight is None or rid not in self.tracked:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{rid} is not running on {self.instance_id}")
        if rid in self.migrations:
            return worker_pb2.MigrateReply(migrated=False, reason=f"{rid} is already migrating")
        tracked = flight.tracked
        admit = worker_pb2.AdmitRequest(request_id=rid, sink_address=tracked.sink, priority=tracked.priority,
                                        output_offset=tracked.output_offset)
        task = asyncio.create_task(self._migrate(request, admit))
        self.migrations[rid] = (task, destination)
        try:
            return await asyncio.shield(task)       # a caller that gives up does not undo a migration
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            return worker_pb2.MigrateReply(migrated=False, reason=f"{rid} was aborted during the migration")

    async def _migrate(self, request: worker_pb2.MigrateRequest, admit: worker_pb2.AdmitRequest):
        rid, destination = request.request_id, request.destination_address
        stub = worker_pb2_grpc.WorkerStub(self._channel(destination))
        try:
            reply = await migrate(self.loop, stub, request, admit)
            await self.loop.call(lambda e: e.abort(rid))     # it runs on the destination now
        except MigrationFailed as e:
            log.info("migration of %s to %s failed: %s", rid, destination, e)
            return worker_pb2.MigrateReply(migrated=False, reason=str(e))
        finally:
            self.migrations.pop(rid, None)
        self._forget(rid)
        self._remember_move(rid, destination)
        self.metrics.kv_transfer("sent", reply.num_bytes, reply.duration_s)
        log.info("migrated %s to %s: %d blocks in %d stages, %.1f ms down", rid, destination,
                 reply.num_blocks, reply.num_stages, reply.downtime_s * 1e3)
        return reply

    def _remember_move(self, rid: str, destination: str) -> None:
        self.moved[rid] = destination
        while len(self.moved) > MOVED_MEMORY:
            self.moved.popitem(last=False)

    # ---- after each step (event loop) -----------------------------------------------------
    def _on_step(self, result: StepResult) -> None:
        by_sink: dict[str, list[token_sink_pb2.TokenEvent]] = {}
        for tracked, out in result.outputs:
            by_sink.setdefault(tracked.sink, []).append(_event(out, tracked.output_offset))
            flight = self.flights.get(out.request_id)
            if flight is None:
                continue
            if out.finished or (out.num_output_tokens == 1 and not tracked.hand_off):
                _settle(flight.prefill_done, worker_pb2.PrefillReply(num_cached_tokens=flight.num_cached_tokens))
            if out.finished:
                self._forget(out.request_id)
        for sink, events in by_sink.items():
            self.pusher.push(sink, events)
        for tracked, payload in result.stages:
            self._send_stage(tracked, payload)
        for keys, data in result.store_writes:
            asyncio.create_task(self._store(keys, data))

    def _send_stage(self, tracked: Tracked, payload) -> None:
        flight = self.flights.get(tracked.request_id)
        if flight is None:
            return
        if flight.stages is None:
            flight.stages, flight.kv_started_at = StageQueue(), time.perf_counter()
            flight.sender = asyncio.create_task(self._push_kv(flight))
        flight.kv_bytes += len(payload.data)
        flight.stages.put(payload)
        if payload.is_final:
            self.tracked.pop(tracked.request_id, None)


    async def _push_kv(self, flight: Flight) -> None:
        rid = flight.tracked.request_id
        stub = worker_pb2_grpc.WorkerStub(self._channel(flight.decode_address))
        reply = worker_pb2.PushKVReply()
        try:
            async for reply in stub.PushKV(flight.stages.chunks()):
                pass
        except grpc.aio.AioRpcError as e:       # settle first: the client gets the real reason, not "aborted"
            message = f"KV transfer of {rid} to {flight.decode_address} failed: {e.details()}"
            _settle(flight.prefill_done, error=(e.code(), message))
            await self._abort(rid)
            return
        self._forget(rid)
        self.metrics.kv_transfer("sent", flight.kv_bytes, time.perf_counter() - flight.kv_started_at)
        _settle(flight.prefill_done, worker_pb2.PrefillReply(num_cached_tokens=flight.num_cached_tokens,
                                                             handed_off=reply.resumed))

    async def _store(self, keys: list[bytes], data: bytes) -> None:
        size = self.engine.layout.bytes_per_block
        blocks = [(k, data[i * size:(i + 1) * size]) for i, k in enumerate(keys)]
        try:
            await self.kvstore.put(self.namespace, blocks)
        except grpc.aio.AioRpcError as e:
            log.warning("kvstore write of %d blocks failed: %s", len(blocks), e.code().name)

    def _on_engine_failure(self, error: Exception) -> None:
        """A step raised: every request here ends with an error rather than hanging."""
        for rid in list(self.flights):
            flight = self.flights[rid]
            event = token_sink_pb2.TokenEvent(request_id=rid, finish_reason="error",
                                              error=f"worker {self.instance_id} failed: {error}")
            self.pusher.push(flight.tracked.sink, [event])
            _settle(flight.prefill_done, error=(grpc.StatusCode.INTERNAL, str(error)))
            asyncio.create_task(self._abort(rid))

    # ---- Abort / Drain / Stats ------------------------------------------------------------
    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortReply:
        return worker_pb2.AbortReply(found=await self._abort(request.request_id))

    async def _abort(self, rid: str) -> bool:
        if not rid:
            return False
        elsewhere = self.moved.pop(rid, None)       # it migrated away: the abort follows it
        migration = self.migrations.pop(rid, None)
        if migration is not None:                   # stop it; the destination may hold a copy already
            migration[0].cancel()
            elsewhere = migration[1]
        flight = self.flights.get(rid)
        self._forget(rid)
        if flight is not None:
            if flight.sender is not None:
                flight.sender.cancel()
            _settle(flight.prefill_done, error=(grpc.StatusCode.CANCELLED, f"{rid} was aborted"))
        found = await self.loop.call(lambda e: e.abort(rid))
        if elsewhere is not None:
            found = await self._abort_on(elsewhere, rid) or found
        return found or flight is not None

    async def _abort_on(self, address: str, rid: str) -> bool:
        stub = worker_pb2_grpc.WorkerStub(self._channel(address))
        try:
            return (await stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=5)).found
        except grpc.aio.AioRpcError:
            return False

    def _forget(self, rid: str) -> None:
        self.flights.pop(rid, None)
        self.tracked.pop(rid, None)

    async def Drain(self, request, context) -> worker_pb2.DrainReply:
        self.draining = not request.cancel
        return worker_pb2.DrainReply(num_remaining=len(self.flights))

    async def Stats(self, request, context) -> worker_pb2.WorkerStats:
        gpu = await asyncio.to_thread(self.gpu_power) if self.gpu is not None else None
        return worker_pb2.WorkerStats(instance_id=self.instance_id, role=self.role, load=self.load(), gpu=gpu)

    async def SetPowerCap(self, request: worker_pb2.PowerCapRequest, context) -> worker_pb2.PowerCapReply:
        if self.gpu is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.instance_id} has no GPU "
                                "power backend (a CPU worker)")
        if not (math.isfinite(request.clock_mhz) and math.isfinite(request.watts)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a cap must be a finite number (clock "
                                f"{request.clock_mhz} MHz, {request.watts} W); 0 and 0 remove the cap")
        clock, watts = request.clock_mhz or None, request.watts or None
        try:    # NVML calls block (ms): off the event loop
            applied = await asyncio.to_thread(self.gpu.apply, clock, watts)
        except PermissionError as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except (ValueError, RuntimeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, ValueError)
                                else grpc.StatusCode.UNAVAILABLE, str(e))
        log.info("power cap (%s): %s", request.reason or "no reason given", applied)
        return worker_pb2.PowerCapReply(applied=applied, gpu=await asyncio.to_thread(self.gpu_power))

    def gpu_power(self) -> worker_pb2.GpuPower:
        r = self.gpu.read()
        return worker_pb2.GpuPower(power_watts=r.power_watts, energy_joules=r.energy_joules,
                                   power_limit_watts=r.power_limit_watts, clock_mhz=r.clock_mhz,
                                   max_clock_mhz=r.max_clock_mhz, clock_cap_mhz=r.clock_cap_mhz or 0.0,
                                   backend=self.gpu.name, can_cap=self.gpu.control is not PowerControl.OFF)

    def load(self) -> common_pb2.WorkerLoad:
        s = self.loop.stats
        return common_pb2.WorkerLoad(num_running=s["num_running"], num_waiting=s["num_waiting"],
                                     num_blocks=s["num_blocks"], num_free_blocks=s["num_free_blocks"],
                                     num_cached_blocks=s["num_cached_blocks"],
                                     num_preemptions=s["num_preemptions"], draining=self.draining,
                                     num_waiting_tokens=s["num_waiting_tokens"] + self._tokens_waiting_for_room(),
                                     requests=self._request_loads())

    def _tokens_waiting_for_room(self) -> int:
        return sum(f.waiting_tokens for f in self.flights.values())

    def _request_loads(self) -> list[common_pb2.RequestLoad]:
        rows = []
        for rid, phase, num_tokens, num_blocks, arrival, max_tokens in self.loop.requests:
            flight = self.flights.get(rid)
            if phase == "decoding" and rid in self.migrations:
                phase = "suspended"
            if phase == "arriving" and flight is not None and flight.waiting_tokens:
                phase, num_tokens = "waiting", flight.waiting_tokens     # queued here for KV room
            rows.append(common_pb2.RequestLoad(
                request_id=rid, phase=PHASES[phase], num_tokens=num_tokens, num_blocks=num_blocks,
                priority=flight.tracked.priority if flight else 0, arrival=arrival, max_tokens=max_tokens))
        listed = {r.request_id for r in rows}
        rows += [common_pb2.RequestLoad(request_id=rid, phase=common_pb2.REQUEST_PHASE_WAITING,
                                        num_tokens=f.waiting_tokens, priority=f.tracked.priority)
                 for rid, f in self.flights.items() if f.waiting_tokens and rid not in listed]
        return rows

    # ---- stopping ---------------------------------------------------------------------------
    async def release_all(self, checkpoint_timeout_s: float) -> int:
        """On the way out (SIGTERM): take no more work, write each running request's full KV blocks to
        the kvstore (checkpoint.py; at most `checkpoint_timeout_s`, 0: no checkpoint), then drop every
        request here and tell its gateway to resume it elsewhere at once (finish_reason "resume").
        Returns how many requests were released."""
        self.draining = True
        write = self.kvstore is not None and checkpoint_timeout_s > 0
        checkpoints = {c.request_id: c for c in await self.loop.call(take_checkpoints, self.tracked, write)}
        if write and checkpoints:
            started = time.perf_counter()
            writes = asyncio.gather(*(self._store(c.keys, c.data) for c in checkpoints.values() if c.keys))
            try:
                async with asyncio.timeout(checkpoint_timeout_s):     # not wait_for (see token_sink.next)
                    await writes
                log.info("checkpointed %d requests (%d KV blocks) to the kvstore in %.0f ms", len(checkpoints),
                         sum(c.num_blocks for c in checkpoints.values()), (time.perf_counter() - started) * 1e3)
            except TimeoutError:
                log.warning("KV checkpoint not done in %.1f s; the rest is recomputed", checkpoint_timeout_s)
        by_sink: dict[str, list[token_sink_pb2.TokenEvent]] = {}
        for rid, flight in list(self.flights.items()):
            done = checkpoints.get(rid)
            by_sink.setdefault(flight.tracked.sink, []).append(token_sink_pb2.TokenEvent(
                request_id=rid, index=done.next_index if done else 0, finish_reason="resume"))
            if flight.sender is not None:
                flight.sender.cancel()
            _settle(flight.prefill_done, error=(grpc.StatusCode.UNAVAILABLE, f"worker {self.instance_id} is stopping"))
            self._forget(rid)
            await self.loop.call(lambda e, rid=rid: e.abort(rid))      # staged or reserved KV too
        for sink, events in by_sink.items():
            self.pusher.push(sink, events)
        return sum(len(events) for events in by_sink.values())

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = aio_channel(address)
        return self._channels[address]

    async def close(self) -> None:
        self.loop.stop()
        if self.gpu is not None:
            self.gpu.close()
        await self.pusher.close()
        for channel in self._channels.values():
            await channel.close()


def _bad_priority(value: int) -> str | None:
    """A priority outside the enum would travel on in this worker's load reports, and the scheduler
    refuses a heartbeat that carries one."""
    if value in common_pb2.Priority.values():
        return None
    return f"priority {value} is not one of PRIORITY_HIGH, PRIORITY_NORMAL, PRIORITY_LOW (or unset)"


class PrefillFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _settle(future: asyncio.Future, result=None, error: tuple[grpc.StatusCode, str] | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(PrefillFailed(*error))
        future.exception()          # nobody may await it (decode-side flights): don't log it as lost
    else:
        future.set_result(result)


def _event(out: RequestOutput, output_offset: int = 0) -> token_sink_pb2.TokenEvent:
    """`output_offset`: a resumed request's tokens continue where the client is (PrefillRequest)."""
    return token_sink_pb2.TokenEvent(
        request_id=out.request_id, index=output_offset + out.num_output_tokens - len(out.new_token_ids),
        token_ids=out.new_token_ids, finish_reason=out.finish_reason or "",
        stop_reason="" if out.stop_reason is None else str(out.stop_reason),
        num_prompt_tokens=out.num_prompt_tokens)
