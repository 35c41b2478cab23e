"""The evacuator around the pure preemption planner: it measures each instance's decode rate from
heartbeats, runs the planner before the other migration policies, judges each deadline once, counts
the replacements a platform should start, and the scheduler's NotifyPreemption feeds it."""
from __future__ import annotations

import asyncio

import pytest

from services.common.cluster import (
    ClusterSnapshot,
    InstanceSpec,
    InstanceState,
    MigrationReason,
    Role,
    WorkerLoad,
)
from services.scheduler.evacuator import DecodeRate, Evacuator
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.migrator import Migrator
from services.scheduler.policies.migration import MigrationConfig
from services.scheduler.policies.preemption import PreemptionConfig, PreemptionNotice
from services.scheduler.registry import Registry
from tests.procs import free_port
from tests.scheduler.test_migration_policy import req
from tests.scheduler.test_migrator import Clock


def state(instance_id: str, heartbeat: float, *requests, role: Role = Role.DECODE) -> InstanceState:
    spec = InstanceSpec(instance_id, role, "127.0.0.1:1", "m", 16, 8192)
    return InstanceState(spec, WorkerLoad(num_running=len(requests), num_blocks=200, num_free_blocks=100,
                                          requests=tuple(requests)), heartbeat)


def test_decode_rate_is_seconds_per_token_from_successive_heartbeats():
    rate = DecodeRate(smoothing=0.5)
    rate.observe(ClusterSnapshot(10.0, (state("d", 10.0, req("a", tokens=100), req("b", tokens=50)),)))
    assert "d" not in rate.seconds_per_token                      # one heartbeat: nothing to compare
    rate.observe(ClusterSnapshot(10.5, (state("d", 10.5, req("a", tokens=110), req("b", tokens=60)),)))
    assert rate.seconds_per_token["d"] == 0.05                    # 10 tokens each in 0.5 s
    rate.observe(ClusterSnapshot(10.7, (state("d", 10.5, req("a", tokens=110)),)))   # no new heartbeat
    assert rate.seconds_per_token["d"] == 0.05
    rate.observe(ClusterSnapshot(11.5, (state("d", 11.5, req("a", tokens=120)),)))   # b left; a: 0.1 s/token
    assert abs(rate.seconds_per_token["d"] - 0.075) < 1e-12       # smoothed halfway
    rate.observe(ClusterSnapshot(12.0, ()))
    assert "d" not in rate.seconds_per_token                      # gone: forgotten


def registry_with_spot(clock: Clock) -> Registry:
    """"spot" decodes a short and a long request; "survivor" is empty."""
    registry = Registry(heartbeat_timeout_s=3.0)
    for name, requests in (("spot", (req("short", 4, max_tokens=10, tokens=64),
                                     req("long", 4, max_tokens=2000, tokens=64))), ("survivor", ())):
        spec = InstanceSpec(name, Role.DECODE, f"127.0.0.1:{free_port()}", "m", 16, 8192)   # nothing listens
        registry.register(spec, clock(), WorkerLoad(num_running=len(requests), num_blocks=200,
                                                    num_free_blocks=190, requests=requests))
    return registry


def beat(registry: Registry, clock: Clock, advance_s: float, tokens: int) -> None:
    """Every request on "spot" generated `tokens` more in `advance_s`."""
    clock.now += advance_s
    load = registry.get("spot").load
    requests = tuple(req(r.request_id, r.num_blocks, max_tokens=r.max_tokens - tokens, tokens=r.num_tokens + tokens)
                     for r in load.requests)
    registry.heartbeat("spot", WorkerLoad(num_running=len(requests), num_blocks=200, num_free_blocks=190,
                                          requests=requests, draining=True), clock())
    registry.heartbeat("survivor", registry.get("survivor").load, clock())


def sample(metrics: SchedulerMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_the_short_request_finishes_in_place_the_long_one_migrates_and_the_deadline_is_judged_once():
    clock, metrics = Clock(), SchedulerMetrics()
    registry = registry_with_spot(clock)
    evacuator = Evacuator(PreemptionConfig(safety_margin_s=3.0), metrics, clock=clock)
    migrator = Migrator(registry, MigrationConfig(), metrics, interval_s=0.5, clock=clock, evacuator=evacuator)
    migrator.plan()                                               # the rate's first observation
    evacuator.notify(PreemptionNotice("spot", clock() + 30.0, "admin"))
    registry.mark_draining("spot")
    beat(registry, clock, 0.5, 10)                                # 0.05 s per token
    moves = migrator.plan()
    assert [(m.request_id, m.destination_id, m.reason) for m in moves] == \
        [("long", "survivor", MigrationReason.PREEMPTION)]        # 1990 tokens: 99.5 s > 26.5 s left
    assert sample(metrics, "ferry_scheduler_evacuating_requests", action="finish") == 1   # short: 0 s
    assert sample(metrics, "ferry_scheduler_evacuation_decisions_total", action="migrate") == 1
    migrator.plan()                                               # the same decisions: not counted again
    assert sample(metrics, "ferry_scheduler_evacuation_decisions_total", action="migrate") == 1
    assert evacuator.replacements(registry.snapshot(clock())) == {"decode": 1}

    clock.now += 31.0                                             # the deadline, both still there
    registry.heartbeat("spot", registry.get("spot").load, clock())
    migrator.plan()
    migrator.plan()
    assert sample(metrics, "ferry_scheduler_preemption_deadlines_total", outcome="requests_left") == 1
    assert sample(metrics, "ferry_scheduler_preemption_deadlines_total", outcome="empty") == 0

    evacuator.forget("spot")
    assert evacuator.notices == {} and sample(metrics, "ferry_scheduler_preempting_instances") == 0


async def test_a_round_during_the_workers_drain_call_plans_the_noticed_instance_just_in_time():
    """The notice reaches the evacuator before the instance is marked draining: a round that runs while
    the worker's Drain call is out must not move its requests as a plain drain (all at once)."""
    clock, metrics = Clock(), SchedulerMetrics()
    registry = registry_with_spot(clock)
    migrator = Migrator(registry, MigrationConfig(), metrics, interval_s=0.5, clock=clock)
    preempting = asyncio.create_task(migrator.preempt(PreemptionNotice("spot", clock() + 30.0)))
    await asyncio.sleep(0)                                        # it awaits the worker's Drain now
    assert registry.get("spot").load.draining and not preempting.done()
    assert {m.reason for m in migrator.plan()} == {MigrationReason.PREEMPTION}
    assert await preempting == 2
    with pytest.raises(KeyError):
        await migrator.preempt(PreemptionNotice("nobody", clock() + 30.0))
    assert set(migrator.evacuator.notices) == {"spot"}            # none kept for an unknown instance


def test_without_a_measured_rate_every_decoding_request_migrates():
    clock, metrics = Clock(), SchedulerMetrics()
    registry = registry_with_spot(clock)
    migrator = Migrator(registry, MigrationConfig(), metrics, interval_s=0.5, clock=clock)
    migrator.evacuator.notify(PreemptionNotice("spot", clock() + 30.0))
    registry.mark_draining("spot")
    moves = migrator.plan()
    assert sorted((m.request_id, m.reason) for m in moves) == \
        [("long", MigrationReason.PREEMPTION), ("short", MigrationReason.PREEMPTION)]


def test_replacements_count_noticed_instances_per_pool():
    evacuator = Evacuator(PreemptionConfig(), SchedulerMetrics())
    for name in ("p0", "d0", "d1"):
        evacuator.notify(PreemptionNotice(name, 100.0))
    snapshot = ClusterSnapshot(0.0, (state("p0", 0.0, role=Role.PREFILL), state("d0", 0.0), state("d1", 0.0),
                                     state("d2", 0.0), state("b0", 0.0, role=Role.BOTH)))
    assert evacuator.replacements(snapshot) == {"prefill": 1, "decode": 2}
