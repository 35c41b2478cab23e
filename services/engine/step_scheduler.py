"""`StepScheduler`: what the engine computes in its next step (continuous batching, chunked prefill).

Every request is a run of tokens, some with KV in the cache ("computed") and some not. A step gives
each chosen request a chunk of its uncomputed tokens under one token budget, so decodes (one token)
and prefill chunks (many) share a batch:

    running (admission order)        waiting (FCFS)
    [A: decode 1][B: prefill 512]    [C ...]   budget 2048 -> A:1, B:512, C: up to 1535

Running requests go first. When blocks run out, the latest admitted running request is preempted
by recompute: its blocks are freed and it waits again at the front of the queue with every token it
has (prefix caching usually makes the recompute cheap). Nothing is dropped. Pure: no model, no clock.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.engine.kv_cache_manager import KVCacheManager
from services.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int          # first token position computed this step (= num_computed_tokens before it)
    num_tokens: int
    samples: bool       # the chunk reaches the last token, so this step samples the next one

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.samples


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]      # decodes first, then prefill chunks
    preempted: tuple[Sequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048


@dataclass
class StepScheduler:
    config: SchedulerConfig
    kv: KVCacheManager
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is already in this engine's blocks (an imported request)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num = min(seq.num_uncomputed_tokens, budget)
            while not self.kv.can_allocate(seq, num):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            chunks.append(self._take(seq, num))
            budget -= num
            i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = self.kv.computed_blocks(seq)
            num = min(seq.num_tokens - len(hits) * self.kv.block_size, budget)
            if not self.kv.can_allocate(seq, num, hits):
                break
            self.waiting.popleft()
            self.kv.record_lookup(seq, hits)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._take(seq, num, hits))
            budget -= num
        decodes = [c for c in chunks if c.is_decode]
        prefills = [c for c in chunks if not c.is_decode]
        return SchedulerOutput(tuple(decodes + prefills), tuple(preempted))

    def postprocess(self, output: SchedulerOutput, token_ids: list[int]) -> None:
        """Record a finished step: chunks' KV is now computed; sampling chunks get their token."""
        sampled = iter(token_ids)
        for chunk in output.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.kv.cache_full_blocks(seq)
            if chunk.samples:
                seq.append_token(next(sampled))

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """End a sequence wherever it is and release its blocks. Idempotent."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _take(self, seq: Sequence, num: int, hits: list[int] | tuple = ()) -> ScheduledChunk:
        self.kv.allocate(seq, num, hits)
        start = seq.num_computed_tokens
        return ScheduledChunk(seq, start, num, samples=start + num == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
