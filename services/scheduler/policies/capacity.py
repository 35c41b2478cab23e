"""Per-instance goodput: how many requests/s one prefill or one decode instance serves within its SLO,
from the engine's performance profile (the same `SimProfile` the sim engine and `ferry sim` run).

    prefill   an M/D/1 queue (DistServe §3): service time D = the profile's time for one prompt of the
              mean length; mean TTFT = D + rho*D / (2(1 - rho)) <= SLO  =>  rho <= 2(S - D) / (2S - D);
              goodput = rho / D
    decode    the largest batch B whose step time stays within the TPOT SLO (also bounded by the KV
              blocks and max_num_seqs); a request holds a slot for `output` steps, so by Little's law
              goodput = B / (output * step(B))

Both are zero when even one request alone misses the SLO. The autoscaler divides demand by these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from services.engine.sim_profile import SimProfile


@dataclass(frozen=True, slots=True)
class Workload:
    prompt_tokens: float      # mean prompt length
    output_tokens: float      # mean generated tokens


@dataclass(frozen=True, slots=True)
class EngineShape:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256


def prefill_goodput(profile: SimProfile, workload: Workload, ttft_slo_s: float) -> float:
    p = max(1.0, workload.prompt_tokens)
    service = float(profile.seconds(p, p * (p + 1) / 2, p))
    if service >= ttft_slo_s:
        return 0.0
    rho = 2 * (ttft_slo_s - service) / (2 * ttft_slo_s - service)
    return rho / service


def decode_batch(profile: SimProfile, workload: Workload, engine: EngineShape, tpot_slo_s: float) -> int:
    """The largest decode batch that keeps a step within the TPOT SLO and fits the KV cache."""
    p, o = max(1.0, workload.prompt_tokens), max(1.0, workload.output_tokens)
    blocks_each = math.ceil((p + o) / engine.block_size)
    limit = min(engine.max_num_seqs, engine.num_blocks // max(1, blocks_each))
    lo, hi = 0, limit
    while lo < hi:                                     # step time grows with the batch: bisect
        mid = (lo + hi + 1) // 2
        if decode_step_s(profile, workload, mid) <= tpot_slo_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def decode_step_s(profile: SimProfile, workload: Workload, batch: int) -> float:
    context = workload.prompt_tokens + workload.output_tokens / 2      # mean context over a request's life
    return float(profile.seconds(batch, batch * context, batch * context))


def decode_goodput(profile: SimProfile, workload: Workload, engine: EngineShape, tpot_slo_s: float) -> float:
    batch = decode_batch(profile, workload, engine, tpot_slo_s)
    if batch == 0:
        return 0.0
    return batch / (max(1.0, workload.output_tokens) * decode_step_s(profile, workload, batch))
