"""`Sequence`: one request's state inside an engine — the one noun the scheduler, the KV cache
manager and the model runner pass between them.

Token accounting (block_size 4, prompt of 6 tokens, 2 generated, the last not yet in the cache):

    token_ids:        p0 p1 p2 p3 | p4 p5 g0 g1
    computed (KV in cache):  7 tokens ------------^ (g1 was just sampled; its KV comes next step)
    block_ids:        [b7]         [b2]
    block_keys:       [k0]               (block 1 is not full yet, so it has no key)
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.common.block_keys import BlockKey, chain_keys
from services.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"            # EOS, a stop token id or a stop string
    LENGTH = "length"        # max_tokens or the model's context
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    block_size: int
    arrival: int = 0                          # admission order; the scheduler preempts the latest first
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0              # tokens whose KV is in this engine's cache
    block_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None      # the stop string or token id that ended it
    num_preemptions: int = 0
    num_cached_blocks: int = 0                # leading blocks whose keys the pool knows
    _keys: list[BlockKey] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """Still computing prompt (or, after a preemption, recomputing) tokens; no sample yet."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def block_keys(self) -> list[BlockKey]:
        """Chained content keys of every full block of tokens (computed incrementally)."""
        if len(self._keys) < self.num_tokens // self.block_size:
            self._keys = chain_keys(self.token_ids, self.block_size, self._keys)
        return self._keys

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: forget the cache, keep every token (nothing is lost)."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids = []
        self.num_cached_blocks = 0
        self.num_preemptions += 1
