"""A decode worker whose KV pool is full queues an arriving hand-off until blocks free up, instead of
refusing it: both requests complete with the engine's greedy output, and the waiting one is reported
to the scheduler as waiting (so freeness and de-fragmentation see the demand)."""
from __future__ import annotations

import asyncio

import pytest

from services.gen.ferry.v1 import common_pb2
from tests.integration.test_migration import greedy, until
from tests.migration_rig import Collected, Rig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(18))
OTHER = " ".join(f"Verse {i}: a slow grey cat sleeps under the warm red sun." for i in range(18))


@pytest.fixture(scope="module")
def small_rig(tmp_path_factory, smollm2_path):
    # 0.02 GB of fp32 KV = 27 blocks of 16 tokens: one ~260-token request with its output fills most of it
    rig = Rig(tmp_path_factory.mktemp("kv-room"), smollm2_path, kv_cache_memory_gb=0.02)
    workers = [rig.launch("prefill", "prefill"), rig.launch("decode")]
    try:
        rig.wait_ready(*workers)
        yield rig
    finally:
        rig.stop_all()


async def test_handoff_waits_for_kv_room_instead_of_failing(small_rig, reference):
    rig = small_rig
    await rig.open()
    try:
        prefill, decode = rig.workers["prefill"], rig.workers["decode"]
        prompt = reference.prompt_ids(PROMPT)
        load = await decode.load()
        other = reference.prompt_ids(OTHER)          # no block in common with `prompt`
        need = -(-(len(prompt) + 120) // 16)
        assert load.num_blocks >= need and load.num_blocks - -(-len(prompt) // 16) < -(-len(other) // 16), \
            "the pool must hold the first request but not both prompts"
        first = await rig.submit(prompt, 120, prefill, decode)
        first_out = Collected()
        collecting = asyncio.create_task(rig.collect(first, first_out))
        second = asyncio.create_task(rig.submit(other, 20, prefill, decode))

        async def second_waits() -> bool:
            return any(r.phase == common_pb2.REQUEST_PHASE_WAITING for r in (await decode.load()).requests)

        await until(second_waits, timeout=60)
        rid = await second
        out = await rig.collect(rid)
        await collecting
        assert first_out.tokens == greedy(reference, prompt, 120)
        assert out.error is None and out.tokens == greedy(reference, other, 20)
        await until(lambda: rig.idle(decode), timeout=10)
    finally:
        await rig.aclose()
