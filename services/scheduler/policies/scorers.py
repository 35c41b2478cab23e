"""Routing scorers: how good an instance is for a request, each in [0, 1] (higher is better).

    prefix_affinity   share of the prompt's blocks whose prefix was recently prefilled there
    free_blocks       free KV blocks / all KV blocks
    short_queue       1 / (1 + running + waiting)

Profiles weigh them (`default_policy`): prefill favours affinity (a cache hit skips compute) and
falls back to the shorter queue; decode wants room and a short batch.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.common.cluster import InstanceState
from services.scheduler.policies.filters import default_filters
from services.scheduler.policies.routing import RouteContext, RoutingPolicy, RoutingProfile, Weighted


@dataclass(frozen=True, slots=True)
class PrefixAffinity:
    name = "prefix_affinity"

    def score(self, ctx: RouteContext, instance: InstanceState) -> float:
        num_keys = len(ctx.request.block_keys)
        if num_keys == 0:
            return 0.0
        return ctx.prefix_depths.get(instance.instance_id, 0) / num_keys


@dataclass(frozen=True, slots=True)
class FreeBlocks:
    name = "free_blocks"

    def score(self, ctx: RouteContext, instance: InstanceState) -> float:
        return instance.load.free_fraction


@dataclass(frozen=True, slots=True)
class ShortQueue:
    """1 for an idle instance, 1/2 with one request, 1/3 with two… (no cluster-wide maximum needed)."""
    name = "short_queue"

    def score(self, ctx: RouteContext, instance: InstanceState) -> float:
        return 1.0 / (1 + instance.load.num_queued)


# Affinity outweighs load: a full prefix hit on a busy instance (2·1 + 1·⅕ with 4 queued) beats a
# cold idle one (1·1), while with no hits anywhere the shorter queue decides.
AFFINITY_WEIGHT = 2.0


def default_policy() -> RoutingPolicy:
    filters = default_filters()
    return RoutingPolicy(
        prefill=RoutingProfile(filters, (Weighted(PrefixAffinity(), AFFINITY_WEIGHT),
                                         Weighted(ShortQueue(), 1.0))),
        decode=RoutingProfile(filters, (Weighted(FreeBlocks(), 1.0), Weighted(ShortQueue(), 1.0))),
        colocated=RoutingProfile(filters, (Weighted(PrefixAffinity(), AFFINITY_WEIGHT),
                                           Weighted(FreeBlocks(), 0.5), Weighted(ShortQueue(), 0.5))),
    )
