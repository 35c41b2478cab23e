"""`ferry serve scheduler`: settings and wiring of the global scheduler process.

    registry (restored from Redis if --redis-url) ─▶ SchedulerService on grpc.aio ─▶ :port
    sweeper task (every heartbeat interval) · Redis flusher task · /metrics on --metrics-port
    migrator task (live migration) · autoscaler task (--autoscale-interval-s; Prometheus or scraping)
    power controller task (--power-budget-watts > 0 and --power-interval-s > 0; Worker.Stats/SetPowerCap)
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from services.common.gpu_power import gpu_spec
from services.common.grpc_util import aio_server, bind
from services.common.lifecycle import run_service
from services.common.settings import check_redis_url, parse_settings, setting
from services.engine.sim_profile import SimProfile
from services.gen.ferry.v1 import scheduler_pb2_grpc
from services.scheduler.autoscaler import Autoscaler, Slo
from services.scheduler.evacuator import Evacuator
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.migrator import Migrator
from services.scheduler.persistence import RedisPersistence
from services.scheduler.policies import load_policy
from services.scheduler.policies.autoscale import AutoscaleConfig, PoolBounds
from services.scheduler.policies.compiled import warm_up
from services.scheduler.policies.migration import MigrationConfig
from services.scheduler.policies.power import PowerConfig
from services.scheduler.policies.preemption import PreemptionConfig
from services.scheduler.power_controller import PowerController
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Registry
from services.scheduler.server import SchedulerService
from services.scheduler.telemetry import telemetry_source

log = logging.getLogger("ferry.scheduler")
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
    preemption_grace_s: float = setting(30.0, "a preemption notice without a deadline leaves this long (GCP's "
                                        "notice; AWS gives 120 s and says when)")
    preemption_safety_margin_s: float = setting(3.0, "a request under a preemption notice finishes in place "
                                                "only if predicted done this long before the deadline")
    routing_config: str = setting("ferry", "routing policy: a preset (ferry, load_aware, round_robin) or a "
                                  "YAML file of filters, weighted scorers and a picker per profile "
                                  "(docs/scheduler.md#routing)")
    autoscale_interval_s: float = setting(0.0, "how often the autoscaler recommends pool sizes (0 = off); "
                                          "GetScaleRecommendations serves them to the platform")
    autoscale_window_s: float = setting(60.0, "the window of the rates and SLO attainment it sizes by")
    prometheus_url: str = setting("", "read the gateways' counters for autoscaling from this Prometheus "
                                  "(http://host:9090) with PromQL; empty = scrape --gateway-metrics-urls itself")
    prometheus_selector: str = setting("", "label matchers added to every PromQL query, e.g. "
                                       'namespace="ferry",ferry_cluster="ferry"')
    gateway_metrics_urls: str = setting("", "comma-separated /metrics URLs of the gateways, scraped when no "
                                        "--prometheus-url is set, or while it does not answer")
    slo_ttft_ms: float = setting(2000.0, "time-to-first-token SLO that sizes the prefill pool (the gateway's)")
    slo_tpot_ms: float = setting(100.0, "time-per-output-token SLO that sizes the decode pool (the gateway's)")
    autoscale_profile: str = setting("llama3-8b-h100", "the workers' performance profile (a services/engine/"
                                     "profiles name or YAML path): the per-instance goodput model")
    autoscale_prefill_replicas: str = setting("1:16", "MIN:MAX prefill replicas the autoscaler recommends")
    autoscale_decode_replicas: str = setting("1:16", "MIN:MAX decode replicas the autoscaler recommends")
    autoscale_attainment_target: float = setting(0.95, "a pool below this SLO attainment gets another replica")
    autoscale_headroom: float = setting(1.2, "capacity provisioned per unit of modeled demand")
    autoscale_prefill_headroom: float = setting(0.0, "the prefill pool's headroom (0 = --autoscale-headroom)")
    autoscale_decode_headroom: float = setting(0.0, "the decode pool's headroom (0 = --autoscale-headroom)")
    autoscale_scale_up_after_s: float = setting(15.0, "a larger size must be asked for this long before it is "
                                                "recommended")
    autoscale_scale_down_after_s: float = setting(120.0, "a smaller size must be asked for this long before it "
                                                  "is recommended (one replica at a time, drained first)")
    autoscale_model: str = setting("", "size only the pools of this served model (empty: every instance of a "
                                   "role is one pool); other models' pools keep their size")
    autoscale_max_num_seqs: int = setting(256, "the decode workers' max_num_seqs (bounds the goodput model)")
    power_budget_watts: float = setting(0.0, "the cluster's GPU power budget: exported for dashboards and "
                                        "alerts, and kept by the power controller (0 = none)")
    power_interval_s: float = setting(5.0, "how often the power controller reads the workers' GPU power and "
                                      "caps (0 = off; it runs only with a budget)")
    power_threshold1: float = setting(0.90, "share of the budget past which the low-priority pools are capped "
                                      "(POLCA threshold 1)")
    power_threshold2: float = setting(0.95, "share of the budget past which every pool is capped (threshold 2); "
                                      "over the budget: every GPU to the clock that fits")
    power_low_priority_pools: str = setting("decode", "pools capped first (comma-separated: prefill, decode, "
                                            "both)")
    power_uncap_margin: float = setting(0.05, "uncap once power is this share of the budget below threshold 1 "
                                        "...")
    power_uncap_after_s: float = setting(30.0, "... and has stayed there this long (one priority group at a "
                                         "time, high first)")
    power_gpu: str = setting("h100-sxm", "the workers' GPU type: clock range and power model (h100-sxm, "
                             "h200-sxm)")
    power_prefill_max_utilization: float = setting(0.7, "a GPU without a TPOT model (prefill) is capped no lower "
                                                   "than the clock that keeps it this busy (its TTFT queue)")

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
        check_redis_url("--redis-url", self.redis_url)
        if self.redis_flush_interval_s <= 0:
            raise ValueError(f"--redis-flush-interval-s must be > 0, got {self.redis_flush_interval_s}")
        unknown = set(self.policy_names) - set(MIGRATION_POLICIES)
        if unknown:
            raise ValueError(f"--migration-policies: unknown {sorted(unknown)}; use some of "
                             f"{', '.join(MIGRATION_POLICIES)}")
        if self.migration_interval_s < 0:
            raise ValueError(f"--migration-interval-s must be >= 0 (0 = off), got {self.migration_interval_s}")
        self.migration_config()               # validates the rest (a ValueError names the setting)
        self.preemption_config()
        if not self.preemption_grace_s > 0:
            raise ValueError(f"--preemption-grace-s {self.preemption_grace_s}: use seconds > 0")
        if self.autoscale_interval_s < 0 or self.autoscale_window_s <= 0:
            raise ValueError(f"--autoscale-interval-s {self.autoscale_interval_s} must be >= 0 (0 = off) and "
                             f"--autoscale-window-s {self.autoscale_window_s} > 0")
        if self.autoscale_interval_s and self.autoscale_window_s < self.autoscale_interval_s:
            raise ValueError(f"--autoscale-window-s {self.autoscale_window_s} must cover at least one "
                             f"--autoscale-interval-s ({self.autoscale_interval_s})")
        if self.prometheus_url and not self.prometheus_url.startswith(("http://", "https://")):
            raise ValueError(f"--prometheus-url {self.prometheus_url!r} must start with http:// or https://")
        if self.slo_ttft_ms <= 0 or self.slo_tpot_ms <= 0:
            raise ValueError("--slo-ttft-ms and --slo-tpot-ms must be > 0")
        if self.power_budget_watts < 0:
            raise ValueError(f"--power-budget-watts must be >= 0 (0 = none), got {self.power_budget_watts}")
        if self.power_interval_s < 0:
            raise ValueError(f"--power-interval-s must be >= 0 (0 = off), got {self.power_interval_s}")
        self.power_config(budget_watts=1.0)   # thresholds, pools, GPU (a ValueError names the setting)
        self.autoscale_config()               # bounds and fractions (a ValueError names the setting)
        try:
            SimProfile.load(self.autoscale_profile)
        except (OSError, ValueError) as e:
            raise ValueError(f"--autoscale-profile: {e}") from None
        if self.prefix_index_size < 1:
            raise ValueError(f"--prefix-index-size must be >= 1, got {self.prefix_index_size}")
        try:
            load_policy(self.routing_config)   # refuse a bad file at startup, with the key that is wrong
        except ValueError as e:
            raise ValueError(f"--routing-config: {e}") from None


    @property
    def policy_names(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.migration_policies.split(",") if p.strip())

    def autoscale_config(self) -> AutoscaleConfig:
        try:
            return AutoscaleConfig(prefill=replica_bounds(self.autoscale_prefill_replicas, "prefill"),
                                   decode=replica_bounds(self.autoscale_decode_replicas, "decode"),
                                   attainment_target=self.autoscale_attainment_target,
                                   headroom=self.autoscale_headroom,
                                   prefill_headroom=self.autoscale_prefill_headroom or None,
                                   decode_headroom=self.autoscale_decode_headroom or None,
                                   scale_up_after_s=self.autoscale_scale_up_after_s,
                                   scale_down_after_s=self.autoscale_scale_down_after_s)
        except ValueError as e:
            raise ValueError(f"autoscaling: {e}") from None

    def autoscaler(self, registry: Registry, metrics: SchedulerMetrics) -> Autoscaler:
        source = telemetry_source(self.prometheus_url, self.prometheus_selector,
                                  (u.strip() for u in self.gateway_metrics_urls.split(",") if u.strip()),
                                  metrics.registry)   # both set: the scraper stands in while Prometheus is down
        return Autoscaler(registry, source, self.autoscale_config(), SimProfile.load(self.autoscale_profile),
                          Slo(self.slo_ttft_ms / 1000, self.slo_tpot_ms / 1000), interval_s=self.autoscale_interval_s,
                          window_s=self.autoscale_window_s, metrics=metrics, max_num_seqs=self.autoscale_max_num_seqs,
                          model=self.autoscale_model)

    def power_config(self, budget_watts: float | None = None) -> PowerConfig:
        pools = frozenset(p.strip() for p in self.power_low_priority_pools.split(",") if p.strip())
        if not pools <= {"prefill", "decode", "both"}:
            raise ValueError(f"--power-low-priority-pools {self.power_low_priority_pools!r}: use some of "
                             "prefill, decode, both")
        try:
            return PowerConfig(budget_watts=budget_watts or self.power_budget_watts, gpu=gpu_spec(self.power_gpu),
                               threshold1=self.power_threshold1, threshold2=self.power_threshold2,
                               low_priority_pools=pools, uncap_margin=self.power_uncap_margin,
                               uncap_after_s=self.power_uncap_after_s, tpot_slo_s=self.slo_tpot_ms / 1000,
                               prefill_max_utilization=self.power_prefill_max_utilization)
        except ValueError as e:
            raise ValueError(f"power (--power-*): {e}") from None

    def preemption_config(self) -> PreemptionConfig:
        try:
            return PreemptionConfig(safety_margin_s=self.preemption_safety_margin_s)
        except ValueError as e:
            raise ValueError(f"--preemption-safety-margin-s: {e}") from None

    def migration_config(self) -> MigrationConfig:
        return MigrationConfig(**{name: name in self.policy_names for name in MIGRATION_POLICIES},
                               load_balance_gap=self.migration_load_balance_gap,
                               max_migrations_per_round=self.migration_max_per_round)


def replica_bounds(text: str, pool: str) -> PoolBounds:
    """"MIN:MAX" -> PoolBounds; the ValueError says which setting and what to write."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return PoolBounds(int(low), int(high))
    except ValueError as e:
        raise ValueError(f"--autoscale-{pool}-replicas {text!r}: use MIN:MAX with 0 <= MIN <= MAX, e.g. 1:16"
                         + (f" ({e})" if str(e) else "")) from None


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
        evacuator = Evacuator(settings.preemption_config(), metrics)
        migrator = Migrator(registry, settings.migration_config(), metrics, interval_s=settings.migration_interval_s,
                            evacuator=evacuator)
        log.info("live migration every %g s: %s", settings.migration_interval_s, ", ".join(settings.policy_names))
    metrics.power_budget.set(settings.power_budget_watts)
    autoscaler = None
    if settings.autoscale_interval_s > 0:
        autoscaler = settings.autoscaler(registry, metrics)
    service = SchedulerService(registry, PrefixIndex(settings.prefix_index_size), policy,
                               heartbeat_interval_s=settings.heartbeat_interval_s,
                               expiry_s=settings.instance_expiry_s, persistence=persistence, metrics=metrics,
                               migrator=migrator, autoscaler=autoscaler,
                               preemption_grace_s=settings.preemption_grace_s)
    server = aio_server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    port = bind(server, settings.host, settings.port)
    await server.start()
    log.info("scheduler listening on %s:%d", settings.host, port)
    tasks = [asyncio.create_task(service.run_sweeper(stop))]
    if migrator is not None:
        tasks.append(asyncio.create_task(migrator.run(stop)))
    if autoscaler is not None:
        tasks.append(asyncio.create_task(autoscaler.run(stop)))
    if settings.power_budget_watts > 0 and settings.power_interval_s > 0:
        power = PowerController(registry, settings.power_config(), SimProfile.load(settings.autoscale_profile),
                                metrics, interval_s=settings.power_interval_s)
        tasks.append(asyncio.create_task(power.run(stop)))
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
