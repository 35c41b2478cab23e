"""Routing scorers: how good each instance is for a request, in [0, 1] (higher is better), computed
for every row of `ctx.table` at once.

    prefix_affinity   (own depth + kvstore_credit · blocks only in the kvstore) / prompt blocks
    free_blocks       free KV blocks / all KV blocks
    short_queue       1 / (1 + running + waiting)
    freeness          Llumnix freeness F after placing this request, mapped by F / (F + half_score_blocks)
    predicted_ttft    1 − (queue + prefill + transfer) / slo_s   (ttft.py)

The YAML profiles (config.py, presets/*.yaml) choose and weigh them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.cluster import Priority
from services.scheduler.policies.freeness import room_per_request
from services.scheduler.policies.instance_table import blocks_for
from services.scheduler.policies.routing import RouteContext
from services.scheduler.prefix_index import KVSTORE_ID


def prefix_depth_column(ctx: RouteContext) -> np.ndarray:
    """Leading prompt blocks each instance recently prefilled (0 where none), one entry per row."""
    table = ctx.table
    depth = np.zeros(len(table))
    for instance_id, num_blocks in ctx.prefix_depths.items():
        row = table.row_of.get(instance_id)
        if row is not None:
            depth[row] = num_blocks
    return depth


@dataclass(frozen=True, slots=True)
class PrefixAffinity:
    """Share of the prompt's blocks the instance can skip computing. Blocks it prefilled itself count
    fully; blocks beyond that which only the kvstore holds (prefill workers write prompt blocks there,
    and any prefill worker can fetch them) count `kvstore_credit` each: fetching is cheaper than
    computing but dearer than a local hit."""
    name = "prefix_affinity"
    kvstore_credit: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.kvstore_credit <= 1:
            raise ValueError(f"kvstore_credit must be in [0, 1], got {self.kvstore_credit}")

    def score(self, ctx: RouteContext) -> np.ndarray | float:
        num_keys = len(ctx.request.block_keys)
        if num_keys == 0:
            return 0.0
        own = prefix_depth_column(ctx)
        in_store_only = np.maximum(0.0, ctx.prefix_depths.get(KVSTORE_ID, 0) - own)
        return (own + self.kvstore_credit * in_store_only) / num_keys


@dataclass(frozen=True, slots=True)
class FreeBlocks:
    name = "free_blocks"

    def score(self, ctx: RouteContext) -> np.ndarray:
        t = ctx.table
        return np.where(t.num_blocks > 0, t.num_free_blocks / np.maximum(t.num_blocks, 1), 0.0)


@dataclass(frozen=True, slots=True)
class ShortQueue:
    """1 for an idle instance, 1/2 with one request, 1/3 with two… (no cluster-wide maximum needed)."""
    name = "short_queue"

    def score(self, ctx: RouteContext) -> np.ndarray:
        return 1.0 / (1 + ctx.table.num_queued)


@dataclass(frozen=True, slots=True)
class Freeness:
    """Llumnix freeness (freeness.py) with this request's blocks as extra demand: free KV blocks per
    running request after the queued requests, the high-priority headroom (not subtracted when the
    request is itself HIGH: that headroom is for it) and this request are placed.

    F is in blocks per request and unbounded above, so it is mapped to [0, 1) by F / (F + h) with
    h = `half_score_blocks`: 0 when nothing is left, ½ at h blocks per request, → 1 as room grows.
    Smooth and needs no cluster-wide maximum; dividing by the pool size instead would squeeze every
    busy instance near 0, where the other scorers' weights would drown it.
    """
    name = "freeness"
    half_score_blocks: float = 32.0

    def __post_init__(self) -> None:
        if not self.half_score_blocks > 0:
            raise ValueError(f"half_score_blocks must be > 0, got {self.half_score_blocks}")

    def score(self, ctx: RouteContext) -> np.ndarray:
        t = ctx.table
        headroom = 0 if ctx.request.priority is Priority.HIGH else t.high_priority_headroom
        room = room_per_request(t.num_free_blocks, t.queued_blocks, headroom,
                                blocks_for(ctx.num_tokens, t), t.num_running)
        room = np.where(t.draining, 0.0, np.maximum(room, 0.0))
        return room / (room + self.half_score_blocks)
