"""Access control at the gateway: who may call (API keys) and how much (per-key rate limits).

Off unless `--api-keys-file` is set. When on, every /v1/ request needs `Authorization: Bearer <key>`:

    no or unknown key               → 401 invalid_api_key, `WWW-Authenticate: Bearer`
    over requests_per_minute        → 429 rate_limit_exceeded, `Retry-After` (generation requests)
    over tokens_per_minute          → 429 (prompt + max_tokens, counted once the prompt is tokenized)
    admitted                        → the response carries x-ratelimit-{limit,remaining,reset}-{requests,tokens}

/health and /metrics stay open (load balancers and Prometheus call them without a key). Rejections are
counted in ferry_gateway_requests_rejected_total{reason, key} under the key's name, never the key; nothing
here logs a key, a header or a body. The buckets are this process's, or with `--rate-limit-redis-url` one
set in Redis shared by every gateway replica (rate_limit_redis.py).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fastapi.responses import JSONResponse

from services.gateway.api_keys import ApiKey, KeysFile
from services.gateway.metrics import GatewayMetrics
from services.gateway.protocol import error_body
from services.gateway.rate_limit import Decision, LocalBuckets

UNAUTHENTICATED, RATE_LIMITED = "unauthenticated", "rate_limited"


@dataclass
class Admission:
    """A key's request let through, with the rate-limit headers its response carries."""
    key: ApiKey
    headers: dict[str, str] = field(default_factory=dict)


class Buckets(Protocol):
    """Where the rate-limit buckets live: this process (rate_limit.LocalBuckets) or Redis, shared by every
    gateway replica (rate_limit_redis.RedisBuckets)."""
    async def take(self, bucket_id: tuple[str, str], per_minute: int, cost: int) -> Decision: ...
    def retain(self, names: set[str]) -> None: ...


class Access:
    def __init__(self, keys: KeysFile, metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic,
                 buckets: Buckets | None = None) -> None:
        self.keys = keys
        self.metrics = metrics
        self.clock = clock
        self.buckets = buckets or LocalBuckets(clock)
        self._ring = keys.ring

    def authenticate(self, authorization: str | None) -> ApiKey | JSONResponse:
        """The key an `Authorization` header names, or the 401 to answer."""
        ring = self.keys.current(self.clock())
        if ring is not self._ring:                  # the file changed: forget the buckets of removed keys
            self.buckets.retain(ring.names)
            self._ring = ring
        scheme, _, presented = (authorization or "").strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return self._unauthenticated("missing API key: send it as `Authorization: Bearer <key>`")
        key = ring.find(presented)
        if key is None:
            return self._unauthenticated("invalid API key: it is not one of this gateway's keys "
                                         "(ask its operator for one)")
        return key

    async def admit_request(self, key: ApiKey) -> Admission | JSONResponse:
        """One generation request against the key's requests_per_minute."""
        admission = Admission(key)
        if key.requests_per_minute is None:
            return admission
        decision = await self.buckets.take((key.name, "requests"), key.requests_per_minute, 1)
        return self._judge(admission, decision, "requests", 1)

    async def admit_tokens(self, admission: Admission, num_tokens: int) -> Admission | JSONResponse:
        """The request's prompt + max_tokens against the key's tokens_per_minute."""
        limit = admission.key.tokens_per_minute
        if limit is None:
            return admission
        decision = await self.buckets.take((admission.key.name, "tokens"), limit, num_tokens)
        return self._judge(admission, decision, "tokens", num_tokens)

    def _judge(self, admission: Admission, d: Decision, what: str, cost: int) -> Admission | JSONResponse:
        headers = {f"x-ratelimit-limit-{what}": str(d.limit), f"x-ratelimit-remaining-{what}": str(d.remaining),
                   f"x-ratelimit-reset-{what}": f"{d.reset_s:.3f}s"}
        if d.is_allowed:
            admission.headers.update(headers)
            return admission
        self.metrics.rejected.labels(RATE_LIMITED, admission.key.name).inc()
        if d.retry_after_s is None:
            message = (f"this request needs {cost} {what} but the key's limit is {d.limit} {what} per minute: "
                       + ("lower max_tokens or shorten the prompt" if what == "tokens" else "ask for a higher limit"))
            return JSONResponse(error_body(message, None, "rate_limit_exceeded", "rate_limit_exceeded"), 429,
                                headers={**admission.headers, **headers})
        retry = max(1, math.ceil(d.retry_after_s))
        message = (f"rate limit reached for key {admission.key.name!r}: {d.limit} {what} per minute; "
                   f"retry in {retry} s")
        return JSONResponse(error_body(message, None, "rate_limit_exceeded", "rate_limit_exceeded"), 429,
                            headers={**admission.headers, **headers, "Retry-After": str(retry)})

    def _unauthenticated(self, message: str) -> JSONResponse:
        self.metrics.rejected.labels(UNAUTHENTICATED, "").inc()
        return JSONResponse(error_body(message, None, "invalid_request_error", "invalid_api_key"), 401,
                            headers={"WWW-Authenticate": "Bearer"})
