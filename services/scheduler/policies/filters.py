"""Routing filters: which instances may take a request at all. Each is one yes/no question.

`why(ctx)` completes the sentence "of N candidate(s), none …" in the NoRoute reason, so an operator
reading "no decode instance for model 'm': of 2 candidate(s), none sent a heartbeat within 3.0 s"
knows what to look at.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.common.cluster import InstanceState
from services.scheduler.policies.routing import Filter, RouteContext


@dataclass(frozen=True, slots=True)
class ServesModel:
    name = "serves_model"

    def keep(self, ctx: RouteContext, instance: InstanceState) -> bool:
        return instance.spec.model == ctx.request.model

    def why(self, ctx: RouteContext) -> str:
        return f"serves model {ctx.request.model!r}"


@dataclass(frozen=True, slots=True)
class Healthy:
    """Heard from within the heartbeat timeout."""
    name = "healthy"

    def keep(self, ctx: RouteContext, instance: InstanceState) -> bool:
        return ctx.snapshot.is_alive(instance)

    def why(self, ctx: RouteContext) -> str:
        return f"is healthy (sent a heartbeat within {ctx.snapshot.heartbeat_timeout_s:g} s)"


@dataclass(frozen=True, slots=True)
class NotDraining:
    name = "not_draining"

    def keep(self, ctx: RouteContext, instance: InstanceState) -> bool:
        return not instance.load.draining

    def why(self, ctx: RouteContext) -> str:
        return "is accepting work (all are draining)"


@dataclass(frozen=True, slots=True)
class FitsContext:
    """The request's tokens fit the instance's context length."""
    name = "fits_context"

    def keep(self, ctx: RouteContext, instance: InstanceState) -> bool:
        return ctx.num_tokens <= instance.spec.max_model_len

    def why(self, ctx: RouteContext) -> str:
        return f"has max_model_len >= {ctx.num_tokens} tokens (prompt + max_tokens)"


@dataclass(frozen=True, slots=True)
class HasKvRoom:
    """Enough free KV blocks for the tokens the instance must hold (see RouteContext.num_tokens).

    An instance that has not sent its first heartbeat reports no blocks, so it takes work only once
    its pool size is known.
    """
    name = "has_kv_room"

    def keep(self, ctx: RouteContext, instance: InstanceState) -> bool:
        return instance.load.num_free_blocks >= instance.spec.num_blocks_for(ctx.num_tokens) \
            and instance.load.num_blocks > 0

    def why(self, ctx: RouteContext) -> str:
        return f"has free KV blocks for {ctx.num_tokens} tokens"


def default_filters() -> tuple[Filter, ...]:
    """Cheapest and most telling first: the NoRoute reason names the first filter that empties the list."""
    return (ServesModel(), Healthy(), NotDraining(), FitsContext(), HasKvRoom())
