"""`ferry serve scheduler`: settings and wiring of the global scheduler process.

    registry (restored from Redis if --redis-url) ─▶ SchedulerService on grpc.aio ─▶ :port
    sweeper task (every heartbeat interval) · Redis flusher task · /metrics on --metrics-port
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from services.common.grpc_util import aio_server, bind
from services.common.lifecycle import run_service
from services.common.settings import parse_settings, setting
from services.gen.ferry.v1 import scheduler_pb2_grpc
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.migrator import Migrator
from services.scheduler.persistence import RedisPersistence
from services.scheduler.policies import load_policy
from services.scheduler.policies.compiled import warm_up
from services.scheduler.policies.migration import MigrationConfig
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Registry
from services.scheduler.server import SchedulerService

log = logging.getLogger("ferry.scheduler")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SHUTDOWN_GRACE_S = 2.0
MIGRATION_POLICIES = ("drain", "priority", "defragmentation", "load_balance")


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    host: str = setting("127.0.0.1", "address to listen on (gRPC and metrics)")
    port: int = setting(50050, "gRPC port (0 = any free port)")
    heartbeat_interval_s: float = setting(0.1, "how often workers are told to send a heartbeat")
    heartbeat_timeout_s: float = setting(3.0, "an instance silent this long is unhealthy (not routed to)")
    instance_expiry_s: float = setting(60.0, "an instance silent this long is forgotten (it must register "
                                       "again)")
    redis_url: str = setting("", "persist the instance registry in this Redis (redis://host:port/db); "
                             "empty = in memory only")
    redis_flush_interval_s: float = setting(1.0, "heartbeats reach Redis at most this often")
    metrics_port: int = setting(-1, "Prometheus /metrics port (-1 = off, 0 = any free port)")
    prefix_index_size: int = setting(100_000, "block keys the prefix-affinity index remembers")
    migration_interval_s: float = setting(0.5, "how often the migration policies run (0 = no live migration)")
    migration_load_balance_gap: float = setting(16.0, "freeness gap (free KV blocks per running request) "
                                                "between two decode instances that triggers a load-balancing "
                                                "migration")
    migration_policies: str = setting("drain,priority,defragmentation,load_balance",
                                      "migration policies that run (comma-separated; drain is needed for "
                                      "DrainInstance)")
    migration_max_per_round: int = setting(8, "migrations started per round at most")
    routing_config: str = setting("ferry", "routing policy: a preset (ferry, load_aware, round_robin) or a "
                                  "YAML file of filters, weighted scorers and a picker per profile "
                                  "(docs/scheduler.md#routing)")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a port: use 0..65535 (0 = any free port)")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port {self.metrics_port}: use -1 (off), 0 (any) or a port")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"--heartbeat-interval-s must be > 0, got {self.heartbeat_interval_s}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(f"--heartbeat-timeout-s {self.heartbeat_timeout_s} must exceed "
                             f"--heartbeat-interval-s {self.heartbeat_interval_s} (a few intervals, so one "
                             "late heartbeat does not mark a worker unhealthy)")
        if self.instance_expiry_s < self.heartbeat_timeout_s:
            raise ValueError(f"--instance-expiry-s {self.instance_expiry_s} must be >= "
                             f"--heartbeat-timeout-s {self.heartbeat_timeout_s}")
        if self.redis_url and not self.redis_url.startswith(REDIS_SCHEMES):
            raise ValueError(f"--redis-url {self.redis_url!r} must start with one of {', '.join(REDIS_SCHEMES)}"
                             " (or be empty for in-memory only)")
        if self.redis_flush_interval_s <= 0:
            raise ValueError(f"--redis-flush-interval-s must be > 0, got {self.redis_flush_interval_s}")
        unknown = set(self.policy_names) - set(MIGRATION_POLICIES)
        if unknown:
            raise ValueError(f"--migration-policies: unknown {sorted(unknown)}; use some of "
                             f"{', '.join(MIGRATION_POLICIES)}")
        if self.migration_interval_s < 0:
            raise ValueError(f"--migration-interval-s must be >= 0 (0 = off), got {self.migration_interval_s}")
        self.migration_config()               # validates the rest (a ValueError names the setting)
        if self.prefix_index_size < 1:
            raise ValueError(f"--prefix-index-size must be >= 1, got {self.prefix_index_size}")
        try:
            load_policy(self.routing_config)   # refuse a bad file at startup, with the key that is wrong
        except ValueError as e:
            raise ValueError(f"--routing-config: {e}") from None


    @property
    def policy_names(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.migration_policies.split(",") if p.strip())

    def migration_config(self) -> MigrationConfig:
        return MigrationConfig(**{name: name in self.policy_names for name in MIGRATION_POLICIES},
                               load_balance_gap=self.migration_load_balance_gap,
                               max_migrations_per_round=self.migration_max_per_round)


async def serve(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    registry = Registry(settings.heartbeat_timeout_s)
    persistence = None
    if settings.redis_url:
        persistence = RedisPersistence(settings.redis_url, settings.redis_flush_interval_s)
        for state in await persistence.load():
            registry.restore(state)
        log.info("restored %d instance(s) from %s", len(registry), settings.redis_url)
    metrics = SchedulerMetrics()
    if settings.metrics_port >= 0:
        log.info("metrics on http://%s:%d/metrics", settings.host,
                 metrics.serve(settings.host, settings.metrics_port))
    log.info("routing policy: %s", settings.routing_config)
    policy = load_policy(settings.routing_config)
    started = time.perf_counter()
    warm_up(policy)      # compile (or load from numba's cache) before the first Route call waits for it
    log.info("routing kernel ready in %.1f s", time.perf_counter() - started)
    migrator = None
    if settings.migration_interval_s > 0:
        migrator = Migrator(registry, settings.migration_config(), metrics, interval_s=settings.migration_interval_s)
        log.info("live migration every %g s: %s", settings.migration_interval_s, ", ".join(settings.policy_names))
    service = SchedulerService(registry, PrefixIndex(settings.prefix_index_size), policy,
                               heartbeat_interval_s=settings.heartbeat_interval_s,
                               expiry_s=settings.instance_expiry_s, persistence=persistence, metrics=metrics,
                               migrator=migrator)
    server = aio_server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    port = bind(server, settings.host, settings.port)
    await server.start()
    log.info("scheduler listening on %s:%d", settings.host, port)
    tasks = [asyncio.create_task(service.run_sweeper(stop))]
    if migrator is not None:
        tasks.append(asyncio.create_task(migrator.run(stop)))
    if persistence is not None:
        tasks.append(asyncio.create_task(persistence.run_flusher(stop)))
    try:
        await stop.wait()
    finally:
        await server.stop(SHUTDOWN_GRACE_S)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if persistence is not None:
            await persistence.close()
        log.info("scheduler stopped")


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(SchedulerSettings, argv, prog="ferry serve scheduler", env_prefix="FERRY_SCHEDULER_",
                              description="The global scheduler: instance registry, heartbeats, routing.")
    return run_service("scheduler", functools.partial(serve, settings))
