"""Llumnix's load metric, shared by the routing scorer and the migration policies.

    freeness = (free blocks − blocks queued requests will take − headroom for high priority) / running

in KV blocks per running request: how much room each request on the instance has left to grow. A
draining instance has −∞ (it takes nothing and gives everything away). Headroom is what the
instance's high-priority requests may still need (their remaining max_tokens), so normal requests
are dispatched elsewhere and, when short, migrated away rather than crowding them.
"""
from __future__ import annotations

import math

import numpy as np

from services.common.cluster import InstanceState, Priority


def queued_blocks(instance: InstanceState) -> int:
    """Blocks the instance's waiting requests will take once admitted."""
    return instance.spec.num_blocks_for(instance.load.num_waiting_tokens)


def high_priority_headroom(instance: InstanceState) -> int:
    """Blocks the instance's high-priority requests may still grow by."""
    return sum(instance.spec.num_blocks_for(r.max_tokens) for r in instance.load.requests
               if r.priority is Priority.HIGH)


def freeness(instance: InstanceState, *, include_headroom: bool = True, extra_blocks: int = 0) -> float:
    """Free KV blocks per running request after queued demand (and the high-priority headroom, unless
    the caller is placing a high-priority request), minus `extra_blocks` (a request being placed)."""
    load = instance.load
    if load.draining:
        return -math.inf
    headroom = high_priority_headroom(instance) if include_headroom else 0
    return float(room_per_request(load.num_free_blocks, queued_blocks(instance), headroom, extra_blocks,
                                  load.num_running))


def room_per_request(num_free_blocks, num_queued_blocks, headroom, extra_blocks, num_running):
    """The freeness formula on numbers or on numpy columns alike (routing scores every instance at once)."""
    return (num_free_blocks - num_queued_blocks - headroom - extra_blocks) / np.maximum(1, num_running)
