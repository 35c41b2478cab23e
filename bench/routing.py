"""Routing decision latency with 1,000 registered instances: `decide()` alone and the Route RPC end to end.

    python bench/routing.py --json bench/out/routing.json          # ~1 min on 2 cores
    python bench/routing.py --decisions 1000 --rpc-calls 300        # quick look

Part 1 (decide): a real `Registry` holds 250 prefill + 750 decode instances (and, as a second cluster,
1,000 colocated ones) with varied loads: pools of 2k–8k blocks, 0–40 running and 0–8 waiting requests,
each listed as a `RequestLoad` (about 10% high priority, 10% low), 1% draining, 1% silent, 1% serving
another model. A `PrefixIndex` is warmed with 20,000 prompts (many sharing one of 300 system prompts)
recorded against prefill instances and the kvstore. Each timed decision is for a random prompt (60%
start with a shared system prompt) and a random priority; between decisions the bench does what the
server does (reserve the chosen instances, record the prefix) and delivers two heartbeats with new
loads (1,000 instances at 2 Hz over ~1,000 routes/s), so every decision sees a new snapshot, as in
production. Only the `decide()` call is timed (the snapshot is taken before the clock starts), in wall
time and in this thread's CPU time (the CPU columns do not count time the OS gave to other processes,
which on a shared 2-core machine is what the wall-time tail mostly is).

Part 2 (rpc): the same disaggregated cluster in a real `SchedulerService` on a grpc.aio loopback
server; a client in the same process calls Route sequentially (request conversion, snapshot,
decide, reserve, prefix record, reply): p50/p99 of the client-observed latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.cluster import (
    InstanceSpec,
    Priority,
    RequestLoad,
    RequestPhase,
    Role,
    RouteRequest,
    WorkerLoad,
)
from services.common.grpc_util import aio_channel, aio_server, bind
from services.gen.ferry.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.convert import PRIORITY_TO_PROTO
from services.scheduler.policies import decide, load_policy
from services.scheduler.policies.config import PRESETS
from services.scheduler.prefix_index import KVSTORE_ID, PrefixIndex
from services.scheduler.registry import Registry
from services.scheduler.server import SchedulerService

MODEL = "llama-8b"
BLOCK_SIZE = 16
KEY_BYTES = 16
NOW = 10_000.0
CLUSTERS = {"disaggregated": (250, 750, 0), "colocated": (0, 0, 1000)}   # prefill, decode, both


@dataclass(frozen=True, slots=True)
class Workload:
    system_prompts: list[tuple[bytes, ...]]
    rng: random.Random

    def prompt_keys(self) -> tuple[bytes, ...]:
        """A prompt's block keys: 60% continue a shared system prompt, the rest are unique."""
        rng = self.rng
        shared = rng.choice(self.system_prompts) if rng.random() < 0.6 else ()
        return shared + tuple(rng.randbytes(KEY_BYTES) for _ in range(rng.randint(1, 48)))

    def request(self, n: int) -> RouteRequest:
        keys = self.prompt_keys()
        priority = self.rng.choices(list(Priority), weights=(1, 8, 1))[0]
        return RouteRequest(f"r{n}", MODEL, keys, len(keys) * BLOCK_SIZE + self.rng.randint(0, BLOCK_SIZE - 1),
                            self.rng.choice((64, 256, 1024)), priority)


def random_load(rng: random.Random, num_blocks: int) -> WorkerLoad:
    requests, used = [], 0
    num_running, num_waiting = rng.randint(0, 40), rng.randint(0, 8)
    for i in range(num_running + num_waiting):
        tokens = rng.randint(64, 3000)
        blocks = -(-tokens // BLOCK_SIZE) if i < num_running else 0
        used += blocks
        requests.append(RequestLoad(f"q{i}", RequestPhase.DECODING if i < num_running else RequestPhase.WAITING,
                                    tokens, blocks, rng.choices(list(Priority), weights=(1, 8, 1))[0], i,
                                    rng.randint(16, 2048)))
    return WorkerLoad(num_running=num_running, num_waiting=num_waiting, num_blocks=num_blocks,
                      num_free_blocks=max(0, num_blocks - used), num_cached_blocks=rng.randint(0, 500),
                      draining=rng.random() < 0.01, requests=tuple(requests),
                      num_waiting_tokens=sum(r.num_tokens for r in requests[num_running:]))


def build_registry(cluster: str, rng: random.Random) -> Registry:
    registry = Registry(heartbeat_timeout_s=3.0)
    num_prefill, num_decode, num_both = CLUSTERS[cluster]
    roles = [Role.PREFILL] * num_prefill + [Role.DECODE] * num_decode + [Role.BOTH] * num_both
    for n, role in enumerate(roles):
        model = "other-model" if rng.random() < 0.01 else MODEL
        spec = InstanceSpec(f"{role.value}-{n:04d}", role, f"10.0.{n // 250}.{n % 250}:50051", model,
                            BLOCK_SIZE, 32768)
        silent_for = 10.0 if rng.random() < 0.01 else rng.uniform(0, 0.5)
        registry.register(spec, NOW - silent_for, random_load(rng, rng.choice((2000, 4000, 8000))))
    return registry


def warm_index(registry: Registry, workload: Workload, num_prompts: int) -> PrefixIndex:
    index = PrefixIndex(100_000)
    prefill_ids = [s.instance_id for s in registry.states() if s.spec.role.can_prefill]
    for _ in range(num_prompts):
        keys = workload.prompt_keys()
        index.record(keys, workload.rng.choice(prefill_ids))
        index.record(keys, KVSTORE_ID)
    return index


def new_workload(seed: int) -> Workload:
    rng = random.Random(seed)
    system = [tuple(rng.randbytes(KEY_BYTES) for _ in range(rng.randint(4, 64))) for _ in range(300)]
    return Workload(system, rng)


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1e3,
            "mean_ms": statistics.fmean(ordered) * 1e3, "n": len(ordered)}


def bench_decide(cluster: str, preset: str, num_decisions: int, seed: int) -> dict:
    workload = new_workload(seed)
    registry = build_registry(cluster, workload.rng)
    index = warm_index(registry, workload, 20_000)
    policy = load_policy(preset)
    ids = [s.instance_id for s in registry.states()]
    samples, cpu_samples, outcomes = [], [], {"routed": 0, "no_route": 0}
    for n in range(num_decisions + 200):            # the first 200 warm up (and build the first table)
        req = workload.request(n)
        now = NOW + n * 1e-3
        for instance_id in workload.rng.sample(ids, 2):   # two heartbeats arrive between two routes
            registry.heartbeat(instance_id, random_load(workload.rng, registry.get(instance_id).load.num_blocks),
                               now)
        snapshot = registry.snapshot(now)
        started, started_cpu = time.perf_counter(), time.thread_time()
        decision = decide(snapshot, req, policy, index, ordinal=n)
        elapsed, elapsed_cpu = time.perf_counter() - started, time.thread_time() - started_cpu
        if n >= 200:
            samples.append(elapsed)
            cpu_samples.append(elapsed_cpu)
        if hasattr(decision, "reason"):
            outcomes["no_route"] += 1
            continue
        outcomes["routed"] += 1
        index.record(req.block_keys, decision.prefill_id)   # what SchedulerService._apply does
        index.record(req.block_keys, KVSTORE_ID)
        decode = registry.get(decision.decode_id)
        registry.reserve(decision.decode_id, decode.spec.num_blocks_for(req.num_total_tokens))
        if decision.prefill_id != decision.decode_id:
            registry.reserve(decision.prefill_id, decode.spec.num_blocks_for(req.num_prompt_tokens))
    cpu = percentiles(cpu_samples)
    return {"part": "decide", "cluster": cluster, "policy": preset, **percentiles(samples),
            "cpu_p50_ms": cpu["p50_ms"], "cpu_p99_ms": cpu["p99_ms"], **outcomes}


async def bench_rpc(num_calls: int, seed: int) -> dict:
    workload = new_workload(seed)
    registry = build_registry("disaggregated", workload.rng)
    index = warm_index(registry, workload, 20_000)
    clock = iter(NOW + n * 1e-3 for n in range(10**9))
    service = SchedulerService(registry, index, load_policy("ferry"), heartbeat_interval_s=0.5, expiry_s=60.0,
                               clock=lambda: next(clock))
    server = aio_server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    samples = []
    try:
        async with aio_channel(f"127.0.0.1:{port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            for n in range(num_calls + 100):
                req = workload.request(n)
                msg = scheduler_pb2.RouteRequest(request_id=req.request_id, model=req.model,
                                                 block_keys=list(req.block_keys),
                                                 num_prompt_tokens=req.num_prompt_tokens, max_tokens=req.max_tokens,
                                                 priority=PRIORITY_TO_PROTO.get(req.priority,
                                                                                common_pb2.PRIORITY_NORMAL))
                started = time.perf_counter()
                await stub.Route(msg, timeout=5)
                if n >= 100:
                    samples.append(time.perf_counter() - started)
    finally:
        await server.stop(None)
    return {"part": "rpc", "cluster": "disaggregated", "policy": "ferry", **percentiles(samples)}


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=5000, help="timed decide() calls per row")
    parser.add_argument("--rpc-calls", type=int, default=2000, help="timed Route RPCs")
    parser.add_argument("--policies", default=",".join(PRESETS), help="presets to measure, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = [bench_decide(cluster, preset, args.decisions, args.seed)
            for cluster in CLUSTERS for preset in args.policies.split(",")]
    if args.rpc_calls > 0:
        rows.append(asyncio.run(bench_rpc(args.rpc_calls, args.seed)))
    print(f"machine: {machine()}")
    print(f"{'part':7} {'cluster':14} {'policy':12} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'cpu p50':>8} {'cpu p99':>8} {'no route':>9}")
    for r in rows:
        cpu = f"{r['cpu_p50_ms']:>8.3f} {r['cpu_p99_ms']:>8.3f}" if "cpu_p50_ms" in r else f"{'-':>8} {'-':>8}"
        print(f"{r['part']:7} {r['cluster']:14} {r['policy']:12} {r['n']:>6} {r['p50_ms']:>8.3f} "
              f"{r['p99_ms']:>8.3f} {r['max_ms']:>8.3f} {cpu} {r.get('no_route', '-'):>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
