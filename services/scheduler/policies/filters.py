"""Routing filters: which instances may take a request at all. Each is one yes/no question, asked of
every row of `ctx.table` at once (a boolean mask).

`why(ctx)` completes the sentence "of N candidate(s), none …" in the NoRoute reason, so an operator
reading "no decode instance for model 'm': of 2 candidate(s), none sent a heartbeat within 3.0 s"
knows what to look at.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.cluster import Priority
from services.scheduler.policies.instance_table import blocks_for
from services.scheduler.policies.routing import Filter, RouteContext


@dataclass(frozen=True, slots=True)
class ServesModel:
    name = "serves_model"

    def keep(self, ctx: RouteContext) -> np.ndarray:
        return ctx.table.model_mask(ctx.request.model)

    def why(self, ctx: RouteContext) -> str:
        return f"serves model {ctx.request.model!r}"


@dataclass(frozen=True, slots=True)
class Healthy:
    """Heard from within the heartbeat timeout (ClusterSnapshot.is_alive)."""
    name = "healthy"

    def keep(self, ctx: RouteContext) -> np.ndarray:
        age = np.maximum(0.0, ctx.snapshot.now - ctx.table.last_heartbeat)
        return age <= ctx.snapshot.heartbeat_timeout_s

    def why(self, ctx: RouteContext) -> str:
        return f"is healthy (sent a heartbeat within {ctx.snapshot.heartbeat_timeout_s:g} s)"


@dataclass(frozen=True, slots=True)
class NotDraining:
    name = "not_draining"

    def keep(self, ctx: RouteContext) -> np.ndarray:
        return ~ctx.table.draining

    def why(self, ctx: RouteContext) -> str:
        return "is accepting work (all are draining)"


@dataclass(frozen=True, slots=True)
class FitsContext:
    """The request's tokens fit the instance's context length."""
    name = "fits_context"

    def keep(self, ctx: RouteContext) -> np.ndarray:
        return ctx.table.max_model_len >= ctx.num_tokens

    def why(self, ctx: RouteContext) -> str:
        return f"has max_model_len >= {ctx.num_tokens} tokens (prompt + max_tokens)"


@dataclass(frozen=True, slots=True)
class HasKvRoom:
    """Enough free KV blocks for the tokens the instance must hold (see RouteContext.num_tokens).

    The high-priority headroom (freeness.high_priority_headroom: what the instance's HIGH requests may
    still grow by) is not room for a normal or low request; a HIGH request may use it. An instance
    that has not sent its first heartbeat reports no blocks, so it takes work only once its pool
    size is known.
    """
    name = "has_kv_room"

    def keep(self, ctx: RouteContext) -> np.ndarray:
        t = ctx.table
        room = t.num_free_blocks
        if ctx.request.priority is not Priority.HIGH:
            room = room - t.high_priority_headroom
        return (room >= blocks_for(ctx.num_tokens, t)) & (t.num_blocks > 0)

    def why(self, ctx: RouteContext) -> str:
        headroom = "" if ctx.request.priority is Priority.HIGH else " beyond the high-priority headroom"
        return f"has free KV blocks for {ctx.num_tokens} tokens{headroom}"


FILTERS: dict[str, type[Filter]] = {f.name: f for f in (ServesModel, Healthy, NotDraining, FitsContext, HasKvRoom)}


def default_filters() -> tuple[Filter, ...]:
    """Cheapest and most telling first: the NoRoute reason names the first filter that empties the list."""
    return (ServesModel(), Healthy(), NotDraining(), FitsContext(), HasKvRoom())
