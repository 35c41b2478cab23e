"""Counters the worker keeps as things happen (the gauges are read from the engine at scrape time, in
http_endpoint.py): KV transfers between workers and prefix-cache lookups.

    ferry_worker_kv_transfer_bytes_total{direction}          KV bytes of completed transfers
    ferry_worker_kv_transfer_duration_seconds{direction}     one request's transfer, first stage to the
                                                             final acknowledgement (prefill -> decode hand-off
                                                             and live migration alike)
    ferry_worker_prefix_cache_queries_total                  prompt tokens looked up in the prefix cache
    ferry_worker_prefix_cache_hits_total                     of those, tokens whose KV was cached

`direction` is "sent" (the prefill worker, a migration's source) or "received" (the decode worker, a
migration's destination). Prefix hits include blocks fetched from the kvstore for that request just
before the lookup (the kvstore counts its own hits). The names follow vLLM's prefix-cache counters.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import Metric

# A hand-off of a short prompt takes ms; a migration of a long context many seconds.
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DIRECTIONS = ("sent", "received")


class WorkerMetrics:
    """The worker's event counters (unregistered: `WorkerCollector` yields them with the gauges)."""

    def __init__(self) -> None:
        self.kv_transfer_bytes = Counter("ferry_worker_kv_transfer_bytes",
                                         "KV bytes of completed transfers between workers", ["direction"],
                                         registry=None)
        self.kv_transfer_duration = Histogram("ferry_worker_kv_transfer_duration_seconds",
                                              "Duration of one request's KV transfer", ["direction"],
                                              buckets=TRANSFER_BUCKETS, registry=None)
        for direction in DIRECTIONS:            # both series exist from the start
            self.kv_transfer_bytes.labels(direction)
            self.kv_transfer_duration.labels(direction)
        self.prefix_queries = Counter("ferry_worker_prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache", registry=None)
        self.prefix_hits = Counter("ferry_worker_prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache", registry=None)

    def kv_transfer(self, direction: str, num_bytes: int, duration_s: float) -> None:
        self.kv_transfer_bytes.labels(direction).inc(num_bytes)
        self.kv_transfer_duration.labels(direction).observe(duration_s)

    def prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries.inc(num_tokens)
        self.prefix_hits.inc(num_hit_tokens)

    def collect(self) -> list[Metric]:
        return [m for metric in (self.kv_transfer_bytes, self.kv_transfer_duration, self.prefix_queries,
                                 self.prefix_hits) for m in metric.collect()]


class PreemptionMetrics:
    """The preemption watcher's series (preemption_watch.py), on /metrics while it runs:

        ferry_worker_preemption_notices_total{source}             termination notices the cloud announced
        ferry_worker_preemption_poll_errors_total{source,kind}    failed looks at the metadata service
        ferry_worker_preemption_notify_failures_total{source}     failed NotifyPreemption calls (retried)
        ferry_worker_preemption_deadline_timestamp_seconds        the earliest notice's deadline (0: none)
    """

    def __init__(self, source: str, error_kinds: tuple[str, ...]) -> None:
        self.source = source
        self.notices = Counter("ferry_worker_preemption_notices", "Termination notices read from the cloud's "
                               "instance metadata", ["source"], registry=None)
        self.poll_errors = Counter("ferry_worker_preemption_poll_errors", "Failed looks at the instance "
                                   "metadata service, by kind", ["source", "kind"], registry=None)
        self.notify_failures = Counter("ferry_worker_preemption_notify_failures", "Failed NotifyPreemption "
                                       "calls to the scheduler", ["source"], registry=None)
        self.deadline = Gauge("ferry_worker_preemption_deadline_timestamp_seconds", "Unix time the announced "
                              "termination is due (0: none)", registry=None)
        self.deadline_unix_s = 0.0
        self.notices.labels(source)            # every series exists from the start, at 0
        self.notify_failures.labels(source)
        for kind in error_kinds:
            self.poll_errors.labels(source, kind)

    def notice(self, deadline_unix_s: float) -> None:
        self.notices.labels(self.source).inc()
        if self.deadline_unix_s == 0 or deadline_unix_s < self.deadline_unix_s:
            self.deadline_unix_s = deadline_unix_s
            self.deadline.set(deadline_unix_s)

    def poll_error(self, kind: str) -> None:
        self.poll_errors.labels(self.source, kind).inc()

    def notify_failure(self) -> None:
        self.notify_failures.labels(self.source).inc()

    def collect(self) -> list[Metric]:
        return [m for metric in (self.notices, self.poll_errors, self.notify_failures, self.deadline)
                for m in metric.collect()]
