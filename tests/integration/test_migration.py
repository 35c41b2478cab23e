"""Live migration between decode workers with the real model (real processes, real gRPC).

The test plays gateway and scheduler (tests/migration_rig.py): it picks the workers and the moments,
then checks what a client would see — every token once, in order, equal to the in-process engine's
greedy output — and that no worker keeps a block afterwards.

    random points    several migrations per request, several requests at once
    faults           destination killed in stage 0 / in stop-and-copy, source killed after hand-off
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from services.engine.sampling import SamplingParams
from services.gen.ferry.v1 import worker_pb2
from tests.migration_rig import Collected, Rig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["The capital of France is", "Write a short story about a lighthouse keeper who",
           "List the planets of the solar system in order:", "def fibonacci(n):"]
LONG_PROMPT = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(40))


@pytest.fixture(scope="module")
def rig(tmp_path_factory, smollm2_path):
    rig = Rig(tmp_path_factory.mktemp("migration"), smollm2_path)
    workers = [rig.launch("prefill", "prefill"), *(rig.launch(f"decode-{i}") for i in range(3))]
    try:
        rig.wait_ready(*workers)
        yield rig
    finally:
        rig.stop_all()


@pytest.fixture
async def live(rig):
    await rig.open()
    yield rig
    await rig.aclose()


def greedy(reference, prompt_ids: list[int], max_tokens: int) -> list[int]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference.engine.generate(
            [prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
    finally:
        torch.set_num_threads(threads)


async def until(check, timeout: float = 60.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


async def settled(rig: Rig, *names: str) -> None:
    """Every block back in the pool, nothing running, on the named workers."""
    workers = [rig.workers[n] for n in names]
    await until(lambda: rig.idle(*workers), timeout=10, interval=0.1)


async def test_migration_at_random_points_keeps_greedy_output_identical(live, reference):
    rig, rng, max_tokens = live, random.Random(4), 96
    decode = [rig.workers[f"decode-{i}"] for i in range(3)]
    prompts = [reference.prompt_ids(p) for p in PROMPTS]
    expected = [greedy(reference, p, max_tokens) for p in prompts]

    async def run(i: int, prompt: list[int]) -> tuple[Collected, int]:
        home = decode[i % len(decode)]
        rid = await rig.submit(prompt, max_tokens, rig.workers["prefill"], home)
        out = Collected()
        collecting = asyncio.create_task(rig.collect(rid, out))
        where, migrated = home, 0
        for point in sorted(rng.sample(range(4, 64), 3)):       # three hops, at random token counts
            await until(lambda point=point: _reached(out, point))
            destination = rng.choice([d for d in decode if d is not where])
            reply = await rig.migrate(rid, where, destination)
            assert reply.migrated, reply.reason
            assert reply.num_blocks >= -(-(len(prompt) + point) // 16) and reply.downtime_s > 0
            where, migrated = destination, migrated + 1
        return await collecting, migrated

    results = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
    for (out, migrated), want in zip(results, expected):
        assert migrated == 3
        assert out.error is None and out.finish_reason == "length"
        assert out.tokens == want                     # no token lost, repeated or changed
    await settled(rig, "prefill", "decode-0", "decode-1", "decode-2")


async def _reached(out: Collected, n: int) -> bool:
    return len(out.tokens) >= n


async def start_worker(rig: Rig, name: str, failpoints: str = ""):
    """One more decode worker (to be killed), slowed at a failpoint so the kill lands where wanted."""
    worker = rig.launch(name, env={"FERRY_FAILPOINTS": failpoints} if failpoints else None)
    await asyncio.to_thread(rig.wait_ready, worker)
    return worker


async def test_migration_destination_killed_in_stage0_request_completes_on_source(live, reference):
    rig = live
    victim = await start_worker(rig, "dest-stage0", "pushkv.stage0=5")
    source = rig.workers["decode-0"]
    prompt = reference.prompt_ids(LONG_PROMPT)
    rid = await rig.submit(prompt, 48, rig.workers["prefill"], source)
    collecting = asyncio.create_task(rig.collect(rid))
    migrating = asyncio.create_task(rig.migrate(rid, source, victim))
    await until(lambda: _arriving(victim, rid))          # reserved there; stage 0 is on its way
    await asyncio.sleep(0.5)
    victim.kill()
    reply = await migrating
    assert not reply.migrated and "KV transfer" in reply.reason
    out = await collecting
    assert out.tokens == greedy(reference, prompt, 48)
    await settled(rig, "decode-0")


async def test_migration_destination_killed_in_stop_and_copy_request_resumes_on_source(live, reference):
    rig = live
    victim = await start_worker(rig, "dest-final", "pushkv.final=5")
    source = rig.workers["decode-1"]
    prompt = reference.prompt_ids(LONG_PROMPT)
    rid = await rig.submit(prompt, 48, rig.workers["prefill"], source)
    out = Collected()
    collecting = asyncio.create_task(rig.collect(rid, out))
    await until(lambda: _reached(out, 4))
    migrating = asyncio.create_task(rig.migrate(rid, source, victim))
    await until(lambda: _suspended(out), timeout=60)     # no token for 0.6 s: the final stage waits there
    victim.kill()
    reply = await migrating
    assert not reply.migrated
    await collecting
    assert out.max_gap() > 0.6                            # it really was suspended, then resumed here
    assert out.tokens == greedy(reference, prompt, 48)
    await settled(rig, "decode-1")


async def test_migration_source_killed_after_handoff_request_completes_on_destination(live, reference):
    rig = live
    source = await start_worker(rig, "source-killed")
    destination = rig.workers["decode-2"]
    prompt = reference.prompt_ids(PROMPTS[1])
    rid = await rig.submit(prompt, 64, rig.workers["prefill"], source)
    out = Collected()
    collecting = asyncio.create_task(rig.collect(rid, out))
    await until(lambda: _reached(out, 8))
    reply = await rig.migrate(rid, source, destination)
    assert reply.migrated, reply.reason
    source.kill()
    await collecting
    assert out.error is None and out.tokens == greedy(reference, prompt, 64)
    await settled(rig, "decode-2")


async def test_migration_abort_mid_migration_frees_both_workers(live, reference):
    rig = live
    source, destination = rig.workers["decode-0"], rig.workers["decode-1"]
    rid = await rig.submit(reference.prompt_ids(LONG_PROMPT), 200, rig.workers["prefill"], source)
    migrating = asyncio.create_task(rig.migrate(rid, source, destination))
    await until(lambda: _arriving(destination, rid))
    await source.stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=5)
    await migrating                   # before or after the hand-over: the abort reaches both workers
    await settled(rig, "decode-0", "decode-1")


async def _suspended(out: Collected, quiet_s: float = 0.6) -> bool:
    """Tokens stopped coming (a decode step here takes well under 0.1 s)."""
    return bool(out.times) and time.perf_counter() - out.times[-1] > quiet_s


async def _arriving(worker, rid: str) -> bool:
    return any(r.request_id == rid for r in (await worker.load()).requests)
