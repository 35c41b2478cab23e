"""The gateway's Prometheus metrics (names follow Prometheus conventions; units in the name).

Besides the latency histograms, the gateway judges each successfully finished generation request
against the cluster's SLO (`--slo-ttft-ms`, `--slo-tpot-ms`) once, when it finishes:

    ferry_gateway_slo_requests_total{slo="ttft"|"tpot"|"all", result="met"|"missed"}
    ferry_gateway_slo_target_seconds{slo="ttft"|"tpot"}

A request with at most one output token has no time per output token and meets the TPOT objective.
`slo="all"` is met when both are; its `met` rate is the goodput (requests/s within the SLO). The
scheduler's autoscaler reads TTFT attainment for the prefill pool and TPOT attainment for decode from
these names; docs/metrics.md has the PromQL.
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.gateway.resume import MAX_RESUMES

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# How a lost worker showed (generation.py, worker_watch.py): its Push stream ended and it did not answer;
# it said it is stopping (after checkpointing its KV); a Prefill (or its KV hand-off) failed as
# UNAVAILABLE; the scheduler stopped hearing from it.
RESUME_REASONS = ("worker_lost", "worker_stopping", "prefill_failed", "scheduler")
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass(frozen=True, slots=True)
class SLO:
    """Per-request latency objectives, in seconds."""
    ttft_s: float = 2.0
    tpot_s: float = 0.1


class GatewayMetrics:
    def __init__(self, slo: SLO | None = None) -> None:
        self.slo = slo or SLO()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ferry_gateway_requests", "Finished HTTP generation requests",
                                ["endpoint", "status"], registry=r)
        self.running = Gauge("ferry_gateway_requests_running", "Requests being generated now", registry=r)
        self.ttft = Histogram("ferry_gateway_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("ferry_gateway_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("ferry_gateway_e2e_request_latency_seconds", "Request latency, send to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ferry_gateway_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("ferry_gateway_generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("ferry_gateway_prompt_cached_tokens", "Prompt tokens served from a KV cache",
                                     registry=r)
        self.aborted = Counter("ferry_gateway_client_disconnects", "Requests aborted because the client left",
                               registry=r)
        self.resumes = Counter("ferry_gateway_request_resumes", "Requests resumed on another worker after losing "
                               "theirs, by how the loss showed", ["reason"], registry=r)
        for reason in RESUME_REASONS:
            self.resumes.labels(reason)
        self.resumes_exhausted = Counter("ferry_gateway_request_resumes_exhausted",
                                         f"Requests that lost their worker more than {MAX_RESUMES} times "
                                         "and ended with an error", registry=r)
        self.resume_prompt_tokens = Counter("ferry_gateway_resume_prompt_tokens",
                                            "Prompt tokens of resumed attempts (the prompt + output so far)",
                                            registry=r)
        self.resume_cached_tokens = Counter("ferry_gateway_resume_cached_tokens",
                                            "Prompt tokens of resumed attempts served from a KV cache "
                                            "(e.g. the lost worker's checkpoint in the kvstore)", registry=r)
        self.slo_requests = Counter("ferry_gateway_slo_requests",
                                    "Successfully finished generation requests by whether they met the SLO",
                                    ["slo", "result"], registry=r)
        self.slo_target = Gauge("ferry_gateway_slo_target_seconds", "Latency objective of each SLO",
                                ["slo"], registry=r)
        self.slo_target.labels("ttft").set(self.slo.ttft_s)
        self.slo_target.labels("tpot").set(self.slo.tpot_s)
        for name in ("ttft", "tpot", "all"):      # every series exists from the start (rates need a 0)
            for result in ("met", "missed"):
                self.slo_requests.labels(name, result)
        self.rejected = Counter("ferry_gateway_requests_rejected",
                                "Requests refused by access control, by reason and API key name (key=\"\": "
                                "no valid key)", ["reason", "key"], registry=r)
        self.rejected.labels("unauthenticated", "")
        self.rate_limit_shared = Gauge("ferry_gateway_rate_limit_shared",
                                       "1: rate limits are counted in Redis, across gateway replicas; 0: by this "
                                       "replica alone (no --rate-limit-redis-url, or Redis unreachable)", registry=r)

    def observe_slo(self, ttft_s: float, tpot_s: float | None) -> None:
        """Judge one successfully finished request (`tpot_s` None: at most one output token)."""
        ttft_met = ttft_s <= self.slo.ttft_s
        tpot_met = tpot_s is None or tpot_s <= self.slo.tpot_s
        for slo, met in (("ttft", ttft_met), ("tpot", tpot_met), ("all", ttft_met and tpot_met)):
            self.slo_requests.labels(slo, "met" if met else "missed").inc()
