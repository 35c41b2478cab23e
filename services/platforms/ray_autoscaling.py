"""The autoscaling policy of a worker pool's Ray Serve deployment: the size the Ferry scheduler recommends.

Ray Serve calls a deployment's policy from its controller on every control-loop tick with an
`AutoscalingContext`; this one returns the `desired` replicas of the pool from the scheduler's
`GetScaleRecommendations` (asked at most every `interval_s`, the rest of the time the last answer). The
decision is the scheduler's (its autoscaler: SLO attainment, queues, KV use, hysteresis, preemption
replacements); Ray only carries it out: it starts replicas where the resources are, and when it stops
one, the replica drains first (ray_service.py). So Ray's own delays are set to 0 and its bounds to the
scheduler's (ray_app.py).

When the scheduler cannot be asked or has not decided yet, the pool keeps its current target.
"""
from __future__ import annotations

import time
from typing import Any

ASK_TIMEOUT_S = 1.0


def desired_of(reply, pool: str) -> int | None:
    """The replicas the scheduler wants for `pool`, None when it has no recommendation (pure)."""
    if not reply.decided_at_unix_s:
        return None
    for rec in reply.pools:
        if rec.pool == pool:
            return int(rec.desired)
    return None


class FollowScheduler:
    """`policy_function` of a pool deployment's autoscaling config (Ray instantiates it once, with
    `policy_kwargs`, and calls it with each tick's context)."""

    def __init__(self, scheduler_address: str, pool: str, interval_s: float = 1.0) -> None:
        self.scheduler_address, self.pool, self.interval_s = scheduler_address, pool, interval_s

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        now = ctx.current_time or time.time()
        if now - state.get("ferry_asked_at", 0.0) >= self.interval_s:
            state["ferry_asked_at"] = now
            desired = self.ask()
            if desired is not None:
                state["ferry_desired"] = desired
        return state.get("ferry_desired", ctx.target_num_replicas), state

    def ask(self) -> int | None:
        import grpc

        from services.common import grpc_util
        from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc

        try:
            with grpc_util.channel(self.scheduler_address) as channel:
                reply = scheduler_pb2_grpc.SchedulerStub(channel).GetScaleRecommendations(
                    scheduler_pb2.ScaleRecommendationsRequest(), timeout=ASK_TIMEOUT_S)
        except grpc.RpcError:
            return None             # the scheduler restarts, or is not up yet: keep the size
        return desired_of(reply, self.pool)
