"""`SimEngine`: the engine with a performance model in place of the model.

Everything but the arithmetic is the real engine's (scheduler, block pool, prefix cache, stopping,
KV export/import); `execute` advances a virtual clock by a roofline estimate of the step and emits
deterministic placeholder tokens (a function of the request's seed and position, so a request that
moves between engines continues the same sequence). Scale tests and the simulator use it.

The clock is virtual by default (the simulator and unit tests run as fast as Python goes). With
`realtime=True` (sim workers, `ferry serve decode --engine sim`) every step also takes its modeled time
on the wall clock: `step` sleeps whatever the model says is left after the bookkeeping ran.

    step seconds = overhead + max(compute, memory)
    compute      = (2 * params * tokens + 4 * layers * hidden * sum(context of each token)) / flops
    memory       = (weight_bytes + kv_bytes_per_token * sum(context read)) / memory_bandwidth

`clock_ratio` (SM clock / its maximum, 1 = uncapped) is set by the worker's simulated GPU when a power
cap locks the clock: compute then takes 1/ratio longer, memory barely longer (sim_profile.py), so a cap
costs latency as it would on a GPU.
"""
from __future__ import annotations

import time

import torch

from services.engine.config import EngineConfig
from services.engine.engine import BaseEngine, RequestOutput
from services.engine.kv_transfer import KVLayout
from services.engine.sampling import step_seed
from services.engine.sim_profile import PROFILES, SimProfile  # noqa: F401 (re-exported)
from services.engine.step_scheduler import SchedulerOutput

# The sim's own KV is tiny but real (never written by steps, so a step costs no tensor work): export and
# import move actual bytes through the same code as the real engine.
SIM_LAYOUT = {"dtype": "float32", "num_layers": 1, "num_kv_heads": 1, "head_dim": 4}


class SimEngine(BaseEngine):
    def __init__(self, config: EngineConfig, profile: SimProfile, num_blocks: int | None = None,
                 realtime: bool = False) -> None:
        config.validate()
        self.profile = profile
        self.realtime = realtime           # pace steps on the wall clock (sleep the modeled remainder)
        self.clock = 0.0                   # virtual seconds since start
        self.last_step_seconds = 0.0
        self.clock_ratio = 1.0             # SM clock / maximum: a float written by the power backend
        num_blocks = num_blocks or config.num_blocks or 4096
        layout = KVLayout(model_id=f"sim:{profile.name}", block_size=config.block_size, **SIM_LAYOUT)
        max_model_len = min(profile.max_model_len, config.max_model_len or profile.max_model_len)
        super().__init__(layout=layout, num_blocks=num_blocks, max_model_len=max_model_len,
                         vocab_size=profile.vocab_size, eos_token_ids=(), config=config)
        self.kv_blocks = torch.zeros(num_blocks, *layout.block_shape)

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        self.last_step_seconds = 0.0       # an empty step costs nothing
        outputs = super().step()
        if self.realtime:
            remaining = started + self.last_step_seconds - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        return outputs

    def execute(self, scheduled: SchedulerOutput) -> list[int]:
        self.last_step_seconds = self.profile.step_seconds(scheduled, self.clock_ratio)
        self.clock += self.last_step_seconds
        return [self.placeholder_token(c.seq.seed, c.seq.num_output_tokens)
                for c in scheduled.chunks if c.samples]

    def placeholder_token(self, seed: int, index: int) -> int:
        return step_seed(seed, index) % self.vocab_size

    def detokenize(self, token_ids: list[int]) -> str:
        return " ".join(f"t{t}" for t in token_ids)

    def read_block_bytes(self, block_ids: list[int]) -> bytes:
        return self.kv_blocks[block_ids].numpy().tobytes() if block_ids else b""

    def write_block_tensor(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.kv_blocks[block_ids] = data.to(self.kv_blocks.dtype)
