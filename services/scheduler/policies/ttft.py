"""The predicted-TTFT scorer: how much of the TTFT SLO a request would have left on each instance.

    predicted = queue + prefill + transfer
      queue    = tokens waiting on the instance            / prefill_tokens_per_s
      prefill  = prompt tokens not cached there or in the
                 kvstore (prefix_affinity's depths)        / prefill_tokens_per_s   (not on a decode-only phase)
      transfer = prompt blocks · bytes_per_block           / transfer_bytes_per_s   (0 when colocated)
    score = clamp(1 − predicted / slo_s)

A linear model with one throughput for every instance: good enough to rank instances against each
other and against the SLO; the parameters come from the YAML (measure them with bench/engine.py and
bench/kv_transfer.py for a deployment).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.scheduler.policies.instance_table import blocks_for
from services.scheduler.policies.routing import Phase, RouteContext
from services.scheduler.policies.scorers import prefix_depth_column
from services.scheduler.prefix_index import KVSTORE_ID

# an 8B Llama block of 16 tokens: 2 (K, V) × 32 layers × 8 KV heads × 128 dims × 2 bytes × 16 tokens
LLAMA_8B_BYTES_PER_BLOCK = 2 * 32 * 8 * 128 * 2 * 16


@dataclass(frozen=True, slots=True)
class PredictedTtft:
    name = "predicted_ttft"
    slo_s: float = 1.0
    prefill_tokens_per_s: float = 8_000.0
    transfer_bytes_per_s: float = 10e9
    bytes_per_block: float = LLAMA_8B_BYTES_PER_BLOCK

    def __post_init__(self) -> None:
        for key in ("slo_s", "prefill_tokens_per_s", "transfer_bytes_per_s", "bytes_per_block"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")

    def predicted_s(self, ctx: RouteContext) -> np.ndarray:
        t, r = ctx.table, ctx.request
        seconds = t.num_waiting_tokens / self.prefill_tokens_per_s
        if ctx.phase is not Phase.DECODE:
            cached_blocks = np.maximum(prefix_depth_column(ctx), ctx.prefix_depths.get(KVSTORE_ID, 0))
            uncached = np.maximum(0, r.num_prompt_tokens - cached_blocks * t.block_size)
            seconds = seconds + uncached / self.prefill_tokens_per_s
        if ctx.phase is not Phase.COLOCATED:
            transfer_bytes = blocks_for(r.num_prompt_tokens, t) * self.bytes_per_block
            seconds = seconds + transfer_bytes / self.transfer_bytes_per_s
        return seconds

    def score(self, ctx: RouteContext) -> np.ndarray:
        return 1.0 - self.predicted_s(ctx) / self.slo_s
