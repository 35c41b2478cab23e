"""`SimProfile`: the performance model of one model on one device, as the sim engine and the cluster
simulator use it (no torch here: `ferry sim` loads profiles without the engine).

    step seconds = overhead + max(compute, memory)
    compute      = (2 * params * tokens + 4 * layers * hidden * sum(context of each token)) / flops
    memory       = (weight_bytes + kv_bytes_per_token * sum(context read)) / memory_bandwidth

At an SM clock below the maximum (a power cap), compute takes f_max / f longer and memory only
(f_max / f) ** 0.1 longer (services/common/gpu_power.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from services.common.gpu_power import MEMORY_CLOCK_EXPONENT, StepCost
from services.common.named_yaml import find_yaml

if TYPE_CHECKING:
    from services.engine.step_scheduler import SchedulerOutput

PROFILES = Path(__file__).parent / "profiles"


@dataclass(frozen=True, slots=True)
class SimProfile:
    """Performance parameters of one model on one GPU type (YAML; `ferry profile` writes them)."""
    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    kv_bytes_per_token: int
    flops: float                        # effective FLOP/s of prefill-sized matrix products
    memory_bandwidth: float             # effective bytes/s of decode-sized reads
    step_overhead_s: float = 0.0
    weight_bytes: float = 0.0           # 0: 2 bytes a parameter (bf16)
    vocab_size: int = 32000
    max_model_len: int = 8192

    @classmethod
    def load(cls, name_or_path: str | Path) -> SimProfile:
        path = find_yaml(name_or_path, PROFILES, "sim profile")
        data = yaml.safe_load(path.read_text())
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"{path}: unknown profile fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        types = {"float": float, "int": int, "str": str}
        return cls(**{f.name: types[f.type](data[f.name]) for f in fields(cls) if f.name in data})

    def step_seconds(self, step: SchedulerOutput, clock_ratio: float = 1.0) -> float:
        context_read = sum(c.start + c.num_tokens for c in step.chunks)
        # Every new token attends on average to half of its chunk plus the cached tokens before it.
        attended = sum(c.num_tokens * (c.start + (c.num_tokens + 1) / 2) for c in step.chunks)
        return float(self.seconds(step.num_tokens, attended, context_read, clock_ratio))

    def seconds(self, tokens, attended, context_read, clock_ratio: float = 1.0):
        """The model on numbers or numpy arrays alike (the cluster simulator times every instance's step
        at once): `tokens` computed, `attended` token pairs of attention, `context_read` KV tokens read;
        `clock_ratio` is the SM clock over its maximum (1: uncapped)."""
        compute, memory = self._roofline(tokens, attended, context_read)
        if clock_ratio != 1.0:
            compute = compute / clock_ratio
            memory = memory / clock_ratio ** MEMORY_CLOCK_EXPONENT
        return self.step_overhead_s + np.maximum(compute, memory)

    def decode_cost(self, num_requests: int, num_context_tokens: int) -> StepCost:
        """A decode step of `num_requests` requests holding `num_context_tokens` tokens in all, at the
        maximum clock, split for the power model (the controller predicts TPOT at lower clocks from it)."""
        compute, memory = self._roofline(num_requests, num_context_tokens, num_context_tokens)
        return StepCost(compute_s=float(compute), memory_s=float(memory), overhead_s=self.step_overhead_s)

    def _roofline(self, tokens, attended, context_read):
        """(compute seconds, memory seconds) at the maximum clock."""
        compute = (2 * self.num_params * tokens + 4 * self.num_layers * self.hidden_size * attended) / self.flops
        weights = self.weight_bytes or 2 * self.num_params
        return compute, (weights + self.kv_bytes_per_token * context_read) / self.memory_bandwidth
