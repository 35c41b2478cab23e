"""The gateway's Prometheus metrics (names follow Prometheus conventions; units in the name)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class GatewayMetrics:
    def __init__(self) -> None:
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
