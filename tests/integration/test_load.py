"""1,000 concurrent streaming requests through one gateway, against sim-engine workers: every one completes
in full (0 errors), the scheduler's Route stays fast, and the gateway and scheduler stay flat in memory.
The numbers of the same run at more detail: bench/load.py, docs/reliability.md#load."""
from __future__ import annotations

import asyncio

import pytest

from bench.load import (
    NULL_PROFILE,
    MemorySampler,
    histogram_quantile,
    route_histogram,
    run_streams,
    start_stack,
    stop_stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.soak]

CONCURRENCY = 1000


def test_a_thousand_concurrent_streams_through_one_gateway_all_complete(tmp_path):
    profile = tmp_path / "null.yaml"
    profile.write_text(NULL_PROFILE)
    stack = start_stack(profile, workers=2, log_dir=tmp_path / "logs", max_num_seqs=CONCURRENCY // 2 + 8)
    sampler = MemorySampler(stack.pids)
    sampler.start()
    try:
        before, _ = route_histogram(stack.metrics_port)
        streams, _ = asyncio.run(run_streams(stack.url, CONCURRENCY, CONCURRENCY, max_tokens=16))
        after, routed = route_histogram(stack.metrics_port)
    finally:
        sampler.done.set()
        sampler.join()
        left = stop_stack(stack)
    failed = [s.error for s in streams if not s.ok]
    assert not failed, (len(failed), sorted(set(failed))[:5])
    assert len(streams) == CONCURRENCY and all(s.e2e_s > 0 for s in streams)
    assert routed - before.get(float("inf"), 0.0) >= CONCURRENCY            # each request routed once at least
    assert histogram_quantile(0.99, before, after) < 0.25, "the scheduler's Route p99 went above 250 ms"
    for name, start in sampler.first.items():
        if name.startswith(("gateway", "scheduler")):
            assert sampler.peak[name] < start + 250, (name, start, sampler.peak[name])   # flat under load
    assert not left, left
