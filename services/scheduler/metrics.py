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
    ferry_scheduler_preempting_instances                instances under a preemption notice now
    ferry_scheduler_evacuating_requests{action}         their requests by the planner's last decision
                                                        (finish | migrate | no_room | wait)
    ferry_scheduler_evacuation_decisions_total{action}  the planner's decisions, counted when a request's changes
    ferry_scheduler_preemption_deadlines_total{outcome} notices whose deadline came: empty | requests_left
    ferry_scheduler_autoscaler_target_replicas{pool}    what the signals ask for now (within the bounds)
    ferry_scheduler_autoscaler_desired_replicas{pool}   the recommendation: target once its hysteresis held
    ferry_scheduler_autoscaler_decisions_total{pool, direction, reason}   recommendations that changed
    ferry_scheduler_autoscaler_slo_attainment{pool}     over the window (prefill: TTFT, decode: TPOT)
    ferry_scheduler_autoscaler_demand_requests_per_second{pool} / _capacity_requests_per_second{pool}
                                                        the demand and per-instance goodput it sized by
    ferry_scheduler_telemetry_errors_total              failed reads of Prometheus or the gateways' /metrics
    ferry_scheduler_power_budget_watts                  the cluster's GPU power budget (0 = none)
    ferry_scheduler_power_watts                         GPU power the power controller last read (sum)
    ferry_scheduler_power_level                         0 normal, 1 past threshold 1, 2 past threshold 2, 3 over
    ferry_scheduler_power_caps{pool, reason}            GPUs capped now, by pool and the level that capped them
    ferry_scheduler_power_cap_changes_total{pool, reason}   SetPowerCap calls that changed a cap (reason: the
                                                        level, or uncap)
    ferry_scheduler_power_cap_errors_total              failed SetPowerCap calls
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
        self.preempting_instances = Gauge("ferry_scheduler_preempting_instances", "Instances under a preemption "
                                          "notice now", registry=self.registry)
        self.evacuating_requests = Gauge("ferry_scheduler_evacuating_requests", "Requests on instances under a "
                                         "preemption notice, by the planner's last decision "
                                         "(finish|migrate|no_room|wait)", ["action"], registry=self.registry)
        self.evacuation_decisions = Counter("ferry_scheduler_evacuation_decisions", "Just-in-time planner "
                                            "decisions for requests on preempted instances, counted when a "
                                            "request's decision changes (finish|migrate|no_room|wait)", ["action"],
                                            registry=self.registry)
        self.preemption_deadlines = Counter("ferry_scheduler_preemption_deadlines", "Preemption deadlines "
                                            "reached, by whether the instance was empty (empty|requests_left)",
                                            ["outcome"], registry=self.registry)
        for outcome in ("empty", "requests_left"):          # exported at 0 before the first notice
            self.preemption_deadlines.labels(outcome=outcome)
        for action in ("finish", "migrate", "no_room", "wait"):
            self.evacuating_requests.labels(action=action).set(0)
            self.evacuation_decisions.labels(action=action)
        self.autoscaler_target = Gauge("ferry_scheduler_autoscaler_target_replicas", "Replicas the "
                                       "autoscaler's signals ask for now, per pool", ["pool"], registry=self.registry)
        self.autoscaler_desired = Gauge("ferry_scheduler_autoscaler_desired_replicas", "Replicas the autoscaler "
                                        "recommends, per pool", ["pool"], registry=self.registry)
        self.autoscaler_decisions = Counter("ferry_scheduler_autoscaler_decisions", "Recommendations that changed "
                                            "a pool's size, by direction (up|down) and reason", ["pool", "direction",
                                                                                               "reason"],
                                            registry=self.registry)
        self.autoscaler_attainment = Gauge("ferry_scheduler_autoscaler_slo_attainment", "Fraction of requests "
                                           "within the pool's SLO over the autoscaler's window (prefill: TTFT, "
                                           "decode: TPOT)", ["pool"], registry=self.registry)
        self.autoscaler_demand = Gauge("ferry_scheduler_autoscaler_demand_requests_per_second", "Requests/s the "
                                       "autoscaler sized the pool for", ["pool"], registry=self.registry)
        self.autoscaler_capacity = Gauge("ferry_scheduler_autoscaler_capacity_requests_per_second",
                                         "Requests/s one instance serves within the SLO (the goodput model)",
                                         ["pool"], registry=self.registry)
        self.telemetry_errors = Counter("ferry_scheduler_telemetry_errors", "Failed reads of Prometheus or the "
                                        "gateways' /metrics by the autoscaler", registry=self.registry)
        self.power_budget = Gauge("ferry_scheduler_power_budget_watts", "GPU power budget of the cluster "
                                  "(0 = none)", registry=self.registry)
        self.power_watts = Gauge("ferry_scheduler_power_watts", "GPU power of the instances the power "
                                 "controller read last round (sum)", registry=self.registry)
        self.power_level = Gauge("ferry_scheduler_power_level", "Power controller level: 0 normal, 1 past "
                                 "threshold 1, 2 past threshold 2, 3 over the budget", registry=self.registry)
        self.power_caps = Gauge("ferry_scheduler_power_caps", "GPUs capped now, by pool and the level that "
                                "capped them (threshold1|threshold2|emergency)", ["pool", "reason"],
                                registry=self.registry)
        self.power_cap_changes = Counter("ferry_scheduler_power_cap_changes", "Power caps applied to workers, by "
                                         "pool and reason (threshold1|threshold2|emergency|uncap)",
                                         ["pool", "reason"], registry=self.registry)
        self.power_cap_errors = Counter("ferry_scheduler_power_cap_errors", "Failed SetPowerCap calls",
                                        registry=self.registry)
        self.migration_bytes = Counter("ferry_scheduler_migration_bytes", "KV bytes moved by live migrations",
                                       ["reason"], registry=self.registry)

    def observe_instances(self, snapshot: ClusterSnapshot) -> None:
        counts = {(role.value, healthy): 0 for role in Role for healthy in ("true", "false")}
        for instance in snapshot.instances:
            healthy = "true" if snapshot.is_alive(instance) else "false"   # draining still counts
            counts[(instance.spec.role.value, healthy)] += 1
        for (role, healthy), n in counts.items():
            self.instances.labels(role=role, healthy=healthy).set(n)

    def observe_scale_decision(self, decision, signals, previous_desired: int) -> None:
        pool = decision.pool
        self.autoscaler_target.labels(pool=pool).set(decision.target)
        self.autoscaler_desired.labels(pool=pool).set(decision.desired)
        for gauge, value in ((self.autoscaler_attainment, signals.slo_attainment),
                             (self.autoscaler_demand, signals.demand_rps),
                             (self.autoscaler_capacity, signals.capacity_rps)):
            if value is not None:
                gauge.labels(pool=pool).set(value)
        if decision.desired != decision.current and decision.desired != previous_desired:
            direction = "up" if decision.desired > decision.current else "down"
            self.autoscaler_decisions.labels(pool=pool, direction=direction, reason=decision.reason).inc()

    def observe_power(self, decision) -> None:
        """The power controller's round (a policies.power.PowerDecision)."""
        self.power_watts.set(decision.total_watts)
        self.power_level.set(("normal", "threshold1", "threshold2", "emergency").index(decision.level.value))
        counts: dict[tuple[str, str], int] = {}
        for cap in decision.caps:
            counts[(cap.pool, cap.reason)] = counts.get((cap.pool, cap.reason), 0) + 1
        for pool in ("prefill", "decode", "both"):
            for reason in ("threshold1", "threshold2", "emergency"):
                self.power_caps.labels(pool=pool, reason=reason).set(counts.get((pool, reason), 0))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (a daemon thread); returns the bound port."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e}") from None
        return server.server_port
