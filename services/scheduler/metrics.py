"""The scheduler's Prometheus metrics, in a registry of their own (served on --metrics-port).

    ferry_scheduler_instances{role, healthy}            gauge, refreshed on every registry change/sweep
    ferry_scheduler_route_decisions_total{result}       disaggregated | colocated | no_route | invalid
    ferry_scheduler_route_duration_seconds              histogram of Route handling time
    ferry_scheduler_routing_decision_seconds            histogram of the routing policy alone (decide())
    ferry_scheduler_migrations_total{reason, outcome}   live migrations decided, by policy and result
    ferry_scheduler_migration_downtime_seconds          histogram: request suspended -> resumed elsewhere
    ferry_scheduler_migration_duration_seconds          histogram: whole migration (all stages)
    ferry_scheduler_migration_bytes_total{reason}       KV bytes moved by completed migrations
    ferry_scheduler_preemption_notices_total{source}    spot-termination notices (NotifyPreemption), by source
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.cluster import ClusterSnapshot, Role

ROUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
MIGRATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025)


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances = Gauge("ferry_scheduler_instances", "Registered instances by role and health",
                               ["role", "healthy"], registry=self.registry)
        self.route_decisions = Counter("ferry_scheduler_route_decisions", "Route calls by result",
                                       ["result"], registry=self.registry)
        self.route_duration = Histogram("ferry_scheduler_route_duration_seconds",
                                        "Time to handle one Route call", buckets=ROUTE_BUCKETS,
                                        registry=self.registry)
        self.routing_decision = Histogram("ferry_scheduler_routing_decision_seconds",
                                          "Time the routing policy takes to decide one request "
                                          "(decide() only: no conversion, no I/O)",
                                          buckets=DECISION_BUCKETS, registry=self.registry)
        self.migrations = Counter("ferry_scheduler_migrations", "Live migrations by reason "
                                  "(drain|priority|defragmentation|load_balance) and outcome "
                                  "(migrated|failed|not_found|error|gone|cancelled)", ["reason", "outcome"],
                                  registry=self.registry)
        self.migration_downtime = Histogram("ferry_scheduler_migration_downtime_seconds",
                                            "Time a migrated request was suspended (stop-and-copy)",
                                            buckets=DOWNTIME_BUCKETS, registry=self.registry)
        self.migration_duration = Histogram("ferry_scheduler_migration_duration_seconds",
                                            "Time a migration took, all stages", buckets=MIGRATION_BUCKETS,
                                            registry=self.registry)
        self.preemption_notices = Counter("ferry_scheduler_preemption_notices", "Preemption notices received "
                                          "by source (node-taint|aws-metadata|gcp-metadata|azure-metadata|admin)",
                                          ["source"], registry=self.registry)
        self.migration_bytes = Counter("ferry_scheduler_migration_bytes", "KV bytes moved by live migrations",
                                       ["reason"], registry=self.registry)

    def observe_instances(self, snapshot: ClusterSnapshot) -> None:
        counts = {(role.value, healthy): 0 for role in Role for healthy in ("true", "false")}
        for instance in snapshot.instances:
            healthy = "true" if snapshot.is_alive(instance) else "false"   # draining still counts
            counts[(instance.spec.role.value, healthy)] += 1
        for (role, healthy), n in counts.items():
            self.instances.labels(role=role, healthy=healthy).set(n)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (a daemon thread); returns the bound port."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e}") from None
        return server.server_port
