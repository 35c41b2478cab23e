"""A rig for live-migration tests and benchmarks: real worker processes, driven directly over gRPC.

    Rig.start_worker("decode-0", role="decode", env=...)   `ferry serve decode` on a free loopback port
    rig.sink                                               the gateway's own TokenSink, in this process
    await rig.submit(prompt_ids, max_tokens, prefill, decode)   Prefill on one worker, decode on another
    await rig.migrate(request_id, source, destination)     Worker.Migrate on the source
    await rig.collect(request_id)                          every token, with its arrival time

The test is the gateway and the scheduler here, so it picks request ids, workers and moments itself.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common.grpc_util import aio_channel, aio_server, bind
from services.gateway.token_sink import TokenSink
from services.gen.ferry.v1 import common_pb2, token_sink_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.procs import free_port, start, stop, wait_for_port

READY_TIMEOUT_S = 180.0
_ids = itertools.count()


@dataclass
class Worker:
    name: str
    address: str
    proc: subprocess.Popen
    channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> worker_pb2_grpc.WorkerStub:
        if self.channel is None:
            self.channel = aio_channel(self.address)
        return worker_pb2_grpc.WorkerStub(self.channel)

    async def load(self) -> common_pb2.WorkerLoad:
        return (await self.stub.Stats(worker_pb2.StatsRequest(), timeout=5)).load

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup (a crash or a lost machine)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Collected:
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)        # perf_counter at each token's arrival
    finish_reason: str | None = None
    error: str | None = None

    def max_gap(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:])), default=0.0)


class Rig:
    def __init__(self, folder: Path, model: Path, *, kv_cache_memory_gb: float = 0.25,
                 threads: int = 1, extra_args: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.model = model
        self.kv_cache_memory_gb = kv_cache_memory_gb
        self.threads = threads
        self.extra_args = extra_args
        self.workers: dict[str, Worker] = {}
        self.sink = TokenSink()
        self.sink_address = ""
        self._server: grpc.aio.Server | None = None

    async def open(self) -> None:
        """Start the in-process sink (in the running event loop; `aclose` ends it)."""
        self.sink = TokenSink()
        self._server = aio_server()
        token_sink_pb2_grpc.add_TokenSinkServicer_to_server(self.sink, self._server)
        self.sink_address = f"127.0.0.1:{bind(self._server, '127.0.0.1', 0)}"
        await self._server.start()

    def launch(self, name: str, service: str = "decode", env: dict[str, str] | None = None,
               args: tuple[str, ...] = ()) -> Worker:
        """Start `ferry serve <service>` (not yet ready: see `wait_ready`)."""
        port = free_port()
        args = ["serve", service, *args, "--model", str(self.model), "--port", str(port), "--kv-cache-memory-gb",
                str(self.kv_cache_memory_gb), "--cpu-threads", str(self.threads), "--instance-id", name,
                *self.extra_args]
        proc = start(args, log=self.folder / f"{name}.log", env=env)
        worker = self.workers[name] = Worker(name, f"127.0.0.1:{port}", proc)
        return worker

    def wait_ready(self, *workers: Worker) -> None:
        for w in workers:
            try:
                wait_for_port(int(w.address.rsplit(":", 1)[1]), w.proc, timeout=READY_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{w.name} did not start: {e}\n{self.tail(w.name)}") from None

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.folder / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    async def submit(self, prompt_ids: list[int], max_tokens: int, prefill: Worker,
                     decode: Worker | None = None, request_id: str | None = None) -> str:
        """Prefill on `prefill`, decode on `decode` (None: on `prefill`); returns once prefill is done."""
        rid = request_id or f"mig-{next(_ids)}"
        self.sink.open(rid)
        await prefill.stub.Prefill(worker_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt_ids, sink_address=self.sink_address,
            decode_address=decode.address if decode is not None else "",
            sampling=common_pb2.SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True)),
            timeout=600)
        return rid

    async def migrate(self, rid: str, source: Worker, destination: Worker, **options) -> worker_pb2.MigrateReply:
        return await source.stub.Migrate(worker_pb2.MigrateRequest(
            request_id=rid, destination_address=destination.address, **options), timeout=120)

    async def collect(self, rid: str, out: Collected | None = None, timeout: float = 120.0) -> Collected:
        """Every token of a request until it finishes (or fails), as the gateway would show it;
        `out` fills as they come (run this as a task and watch it)."""
        stream = self.sink.streams[rid]
        out = out if out is not None else Collected()
        while True:
            delta = await stream.next(timeout)
            now = time.perf_counter()
            out.tokens.extend(delta.token_ids)
            out.times.extend([now] * len(delta.token_ids))
            if delta.finish_reason is not None:
                out.finish_reason, out.error = delta.finish_reason, delta.error
                self.sink.close(rid)
                return out

    async def idle(self, *workers: Worker) -> bool:
        """No request anywhere and every block free on these workers."""
        for w in workers:
            load = await w.load()
            if load.num_running or load.num_waiting or load.requests or load.num_free_blocks != load.num_blocks:
                return False
        return True

    async def aclose(self) -> None:
        """Close this event loop's channels and the sink; the worker processes keep running."""
        for w in self.workers.values():
            if w.channel is not None:
                await w.channel.close()
                w.channel = None
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    def stop_all(self) -> None:
        for w in self.workers.values():
            stop(w.proc)
