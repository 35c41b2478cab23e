"""The Migrator's bookkeeping around the pure policies: a request being moved, or just moved, is not
decided again (in flight, then a cool-down), and a drained instance is marked for routing at once."""
from __future__ import annotations

from services.common.cluster import InstanceSpec, MigrationReason, Role, WorkerLoad
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.migrator import Migrator
from services.scheduler.policies.migration import MigrationConfig
from services.scheduler.registry import Registry
from tests.procs import free_port
from tests.scheduler.test_migration_policy import req


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cluster(clock: Clock) -> Registry:
    """d0 is nearly full with two decoding requests; d1 is empty: load balancing moves one."""
    registry = Registry(heartbeat_timeout_s=3.0)
    for name, requests, free in (("d0", (req("a", 40, arrival=1), req("b", 40, arrival=2)), 10),
                                 ("d1", (), 200)):
        spec = InstanceSpec(name, Role.DECODE, f"127.0.0.1:{free_port()}", "m", 16, 8192)   # nothing listens
        load = WorkerLoad(num_running=len(requests), num_blocks=200, num_free_blocks=free, requests=requests)
        registry.register(spec, clock(), load)
    return registry


def test_migrator_plans_load_balance_then_skips_in_flight_and_cooling_requests():
    clock = Clock()
    migrator = Migrator(cluster(clock), MigrationConfig(max_migrations_per_instance=1), SchedulerMetrics(),
                        interval_s=0.5, cooldown_s=5.0, clock=clock)
    first = migrator.plan()
    assert [(m.request_id, m.source_id, m.destination_id, m.reason) for m in first] == \
        [("b", "d0", "d1", MigrationReason.LOAD_BALANCE)]          # last come first
    migrator.in_flight["b"] = None                                  # being moved: not decided again
    assert "b" not in {m.request_id for m in migrator.plan()}
    del migrator.in_flight["b"]
    migrator._cooling["b"] = clock() + 5.0                          # just moved: cools down
    assert "b" not in {m.request_id for m in migrator.plan()}
    clock.now += 6.0                                                # cooled; heartbeats still fresh
    migrator.registry.heartbeat("d0", migrator.registry.get("d0").load, clock())
    migrator.registry.heartbeat("d1", migrator.registry.get("d1").load, clock())
    assert "b" in {m.request_id for m in migrator.plan()}


async def test_migrator_drain_marks_the_instance_draining_even_when_the_worker_is_unreachable():
    clock = Clock()
    migrator = Migrator(cluster(clock), MigrationConfig(), SchedulerMetrics(), interval_s=0.5, clock=clock)
    assert await migrator.drain("d0") == 2                          # its worker's Drain fails: unreachable
    assert migrator.registry.get("d0").load.draining
    moves = migrator.plan()
    assert {m.request_id for m in moves} == {"a", "b"} and {m.reason for m in moves} == {MigrationReason.DRAIN}
