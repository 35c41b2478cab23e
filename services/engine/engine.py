"""`LLMEngine`: the engine loop of one worker — `add_request`, `step`, `abort`, `export_kv`, `import_kv`.

    step():  schedule  ->  run (model or performance model)  ->  sample  ->  postprocess / stop

The engine owns a `StepScheduler` (which owns the `KVCacheManager`) and a runner. `LLMEngine` runs the
real model; `SimEngine` (sim_engine.py) swaps in a performance model and keeps everything else.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch

from services.common.block_keys import BlockKey, from_hex, to_hex
from services.engine.block_pool import OutOfBlocks
from services.engine.config import EngineConfig, ModelConfig
from services.engine.kv_cache_manager import KVCacheManager
from services.engine.kv_transfer import KVLayout, KVPayload
from services.engine.sampling import SamplingParams, sample
from services.engine.sequence import FinishReason, Sequence
from services.engine.step_scheduler import SchedulerConfig, SchedulerOutput, StepScheduler
from services.engine.stopping import check_stop


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request (its new token), and whether it has ended."""
    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None          # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class KVExport:
    """A planned export: the payload's metadata and the blocks whose bytes it will carry."""
    meta: dict
    block_ids: tuple[int, ...]

    def read(self, engine: BaseEngine) -> KVPayload:
        return KVPayload(**self.meta, data=engine.read_block_bytes(list(self.block_ids)))


class BaseEngine(ABC):
    """Everything but the arithmetic: requests, scheduling, stopping, KV export/import."""

    def __init__(self, *, layout: KVLayout, num_blocks: int, max_model_len: int, vocab_size: int,
                 eos_token_ids: tuple[int, ...], config: EngineConfig) -> None:
        self.layout = layout
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = StepScheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                                       self.kv)
        self.seqs: dict[str, Sequence] = {}
        self._staged: dict[str, list[int]] = {}       # request id -> blocks of an import in progress
        self._reserved: dict[str, list[int]] = {}     # request id -> blocks set aside for its import
        self._suspended: dict[str, Sequence] = {}     # running requests paused for a stop-and-copy
        self._arrivals = count()
        self._random = random.Random(config.seed)
        self.num_preemptions = 0

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._validate(request_id, list(prompt_token_ids), params)
        seed = params.seed if params.seed is not None else self._random.getrandbits(63)
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, seed,
                       self.layout.block_size, arrival=next(self._arrivals))
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.seqs or request_id in self._staged or request_id in self._reserved:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise ValueError("the prompt is empty: send at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_model_len} tokens; shorten one of them")
        blocks = -(-(len(prompt) + params.max_tokens) // self.layout.block_size)
        if blocks > self.kv.pool.num_blocks:
            raise ValueError(f"the request needs {blocks} KV blocks but this worker has "
                             f"{self.kv.pool.num_blocks}; lower max_tokens")

    def abort(self, request_id: str) -> bool:
        """End a request and free its blocks (also an import in progress or a reservation). False if
        unknown."""
        staged = self._staged.pop(request_id, None)
        if staged is not None:
            self.kv.pool.free(reversed(staged))
        reserved = self._reserved.pop(request_id, None)
        if reserved is not None:
            self.kv.pool.free(reserved)
        self._suspended.pop(request_id, None)
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return staged is not None or reserved is not None
        self.scheduler.finish(seq, FinishReason.ABORT)
        return True

    # ---- live migration -------------------------------------------------------------------
    def reserve(self, request_id: str, num_blocks: int) -> None:
        """Set `num_blocks` free blocks aside for a request about to be imported (the destination of a
        migration reserves before the first stage is sent). OutOfBlocks when they are not free."""
        if request_id in self.seqs or request_id in self._staged or request_id in self._reserved:
            raise ValueError(f"request id {request_id!r} is already in use here")
        self._reserved[request_id] = self.kv.pool.allocate(num_blocks)

    def suspend(self, request_id: str) -> None:
        """Pause a decoding request (stop-and-copy): it keeps its blocks but is not scheduled until
        `resume` or `abort`. ValueError unless it is running and decoding."""
        seq = self.seqs.get(request_id)
        if seq is None or seq not in self.scheduler.running or seq.is_prefilling:
            state = "unknown" if seq is None else seq.status.value + (" (prefilling)" if seq.is_prefilling else "")
            raise ValueError(f"{request_id} cannot be suspended: it is {state}, not decoding")
        self.scheduler.running.remove(seq)
        self._suspended[request_id] = seq

    def resume(self, request_id: str) -> None:
        """Put a suspended request back into the running batch (a migration that failed)."""
        seq = self._suspended.pop(request_id)
        running = self.scheduler.running
        at = next((i for i, other in enumerate(running) if other.arrival > seq.arrival), len(running))
        running.insert(at, seq)           # its place in admission order (preemption takes the latest)

    def is_suspended(self, request_id: str) -> bool:
        return request_id in self._suspended

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (offline use, tests and benchmarks); output token ids per prompt."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        base = next(self._arrivals)
        ids = [f"generate-{base}-{i}" for i in range(len(prompts))]
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        while any(rid in self.seqs for rid in ids):
            for out in self.step():
                if out.request_id in outputs:
                    outputs[out.request_id].extend(out.new_token_ids)
        return [outputs[rid] for rid in ids]

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        if scheduled.is_empty:
            return []
        token_ids = self.execute(scheduled)
        self.scheduler.postprocess(scheduled, token_ids)
        return [self._after_sample(c.seq) for c in scheduled.chunks if c.samples]

    @abstractmethod
    def execute(self, scheduled: SchedulerOutput) -> list[int]:
        """One token for each chunk that samples, in order."""

    @abstractmethod
    def detokenize(self, token_ids: list[int]) -> str:
        """Text of token ids (stop strings are checked on it)."""

    def _after_sample(self, seq: Sequence) -> RequestOutput:
        stop = check_stop(seq, self.eos_token_ids, self.max_model_len,
                          self.detokenize if seq.params.stop else None)
        if stop is not None:
            self.scheduler.finish(seq, *stop)
            del self.seqs[seq.request_id]
        return RequestOutput(seq.request_id, (seq.token_ids[-1],), seq.is_finished,
                             seq.finish_reason.value if seq.finish_reason else None, seq.stop_reason,
                             seq.num_prompt_tokens, seq.num_output_tokens)

    # ---- KV export / import ---------------------------------------------------------------
    def export_kv(self, request_id: str, blocks: slice | None = None) -> KVPayload:
        """A request's state and the KV of `blocks` (a range of its block table; default: all)."""
        return self.plan_export(request_id, blocks).read(self)

    def plan_export(self, request_id: str, blocks: slice | None = None) -> KVExport:
        """`export_kv` without reading the KV yet: `.read(engine)` may run on another thread while
        steps go on, because a live request's full blocks never change (a migration's pre-copy
        stages use this, so copying them costs the decode loop nothing). If the request ends or is
        preempted meanwhile, the bytes read are garbage: the caller checks that and drops them."""
        seq = self.seqs.get(request_id)
        if seq is None:
            raise KeyError(f"unknown request {request_id!r}")
        with_kv = seq.blocks_needed(seq.num_computed_tokens)
        chosen = range(with_kv)[blocks or slice(None)]
        if chosen.step != 1:
            raise ValueError("export a contiguous block range (step 1)")
        num_full = min(chosen.stop, seq.num_computed_tokens // self.layout.block_size)
        meta = {"layout": self.layout, "request_id": request_id, "token_ids": tuple(seq.token_ids),
                "num_prompt_tokens": seq.num_prompt_tokens, "num_computed_tokens": seq.num_computed_tokens,
                "params": seq.params, "seed": seq.seed, "first_block": chosen.start, "num_blocks": len(chosen),
                "block_keys": tuple(to_hex(seq.block_keys[chosen.start:num_full]))}
        return KVExport(meta, tuple(seq.block_ids[chosen.start:chosen.stop]))

    def import_kv(self, payload: KVPayload) -> bool:
        """Take a payload's blocks; when it is the final one, the request resumes here. Returns that."""
        payload.layout.check(self.layout)
        rid = payload.request_id
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already running here")
        staged = self._staged.get(rid, [])
        if payload.first_block != len(staged):
            raise ValueError(f"{rid}: blocks arrive out of order: have {len(staged)}, payload starts at "
                             f"{payload.first_block}")
        if payload.token_ids and not (min(payload.token_ids) >= 0 and max(payload.token_ids) < self.vocab_size):
            raise ValueError(f"{rid}: token ids outside the vocabulary [0, {self.vocab_size})")
        staged = staged + self._take_blocks(payload)
        if not payload.is_final:
            self._staged[rid] = staged
            return False
        self._staged.pop(rid, None)
        leftover = self._reserved.pop(rid, None)
        if leftover:
            self.kv.pool.free(leftover)
        seq = Sequence(rid, list(payload.token_ids), payload.num_prompt_tokens, payload.params,
                       payload.seed, self.layout.block_size, arrival=next(self._arrivals),
                       num_computed_tokens=payload.num_computed_tokens, block_ids=staged)
        self.seqs[rid] = seq       # its full blocks join the prefix cache after its next step (postprocess)
        self.scheduler.add_running(seq)
        return True

    def _take_blocks(self, payload: KVPayload) -> list[int]:
        """Blocks for the payload: prefix-cache hits by key are shared, the rest allocated and written."""
        pool = self.kv.pool
        keys = from_hex(payload.block_keys)
        hits = [pool.cached.get(k) for k in keys] + [None] * (payload.num_blocks - len(keys))
        num_new = sum(1 for h in hits if h is None)
        num_revived = sum(1 for h in hits if h is not None and pool.ref_counts[h] == 0)
        reserved = self._reserved.get(payload.request_id, [])
        from_reserve = min(num_new, len(reserved))
        if num_new - from_reserve + num_revived > pool.num_free:
            raise OutOfBlocks(f"{payload.request_id}: {num_new - from_reserve + num_revived} free KV blocks "
                              f"needed, {pool.num_free} available")
        pool.touch(h for h in hits if h is not None)
        taken, reserved[:] = reserved[:from_reserve], reserved[from_reserve:]
        fresh = iter(taken + pool.allocate(num_new - from_reserve))
        block_ids = [h if h is not None else next(fresh) for h in hits]
        write = [i for i, h in enumerate(hits) if h is None]
        if write:
            data = payload.blocks()
            self.write_block_tensor([block_ids[i] for i in write], data[write])
        return block_ids

    def cache_blocks(self, keys: list[BlockKey], data: torch.Tensor) -> int:
        """Write full blocks fetched from elsewhere (the kvstore) as prefix-cache entries, so the next
        request with this prefix hits them. Keys cached already are skipped; stops when no block is
        free. `data` is [len(keys), *block_shape]. Returns how many blocks were written."""
        pool = self.kv.pool
        todo = [i for i, k in enumerate(keys) if k not in pool.cached][:pool.num_free]
        if not todo:
            return 0
        block_ids = pool.allocate(len(todo))
        self.write_block_tensor(block_ids, data[todo])
        for block_id, i in zip(block_ids, todo):
            pool.cache(block_id, keys[i])
        pool.free(reversed(block_ids))        # cached free: the prefix survives until LRU reuse
        return len(todo)

    def num_cached_prefix_blocks(self, keys: list[BlockKey]) -> int:
        """How many leading `keys` this engine's prefix cache holds. No side effects."""
        return len(self.kv.pool.lookup(keys))

    @abstractmethod
    def read_block_bytes(self, block_ids: list[int]) -> bytes:
        """Raw KV of blocks, in `KVLayout` order."""

    @abstractmethod
    def write_block_tensor(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Store [n, layers, 2, block_size, kv_heads, head_dim] into blocks."""

    def request_loads(self) -> list[tuple[str, str, int, int, int, int]]:
        """(request id, phase, tokens, blocks held, arrival, tokens it may still generate) of every
        request here; phase is waiting | prefilling | decoding | suspended | arriving."""
        rows = []
        for rid, seq in self.seqs.items():
            if rid in self._suspended:
                phase = "suspended"
            elif seq.status.value == "waiting":
                phase = "waiting"
            else:
                phase = "prefilling" if seq.is_prefilling else "decoding"
            rows.append((rid, phase, seq.num_tokens, len(seq.block_ids), seq.arrival,
                         seq.params.max_tokens - seq.num_output_tokens))
        for rid, blocks in self._staged.items():
            rows.append((rid, "arriving", 0, len(blocks) + len(self._reserved.get(rid, ())), 0, 0))
        for rid, blocks in self._reserved.items():
            if rid not in self._staged:
                rows.append((rid, "arriving", 0, len(blocks), 0, 0))
        return rows

    @property
    def stats(self) -> dict[str, int]:
        pool = self.kv.pool
        return {"num_running": len(self.scheduler.running) + len(self._suspended),
                "num_waiting": len(self.scheduler.waiting),
                "num_waiting_tokens": sum(s.num_uncomputed_tokens for s in self.scheduler.waiting),
                "num_blocks": pool.num_blocks, "num_free_blocks": pool.num_free,
                "num_cached_blocks": len(pool.cached), "num_preemptions": self.num_preemptions}


class LLMEngine(BaseEngine):
    """The real engine: a Llama-family model over the paged KV cache, on CPU or CUDA."""

    def __init__(self, config: EngineConfig) -> None:
        from services.engine.model_runner import ModelRunner

        config.validate()
        model_config = ModelConfig.from_folder(config.model)
        limits = [model_config.max_position_embeddings, config.max_model_len or 8192,
                  model_config.sliding_window or 1 << 30]
        max_model_len = min(limits)
        self.runner = ModelRunner(config, model_config, max_model_len)
        layout = KVLayout(config.model_id or Path(config.model).name, config.dtype, config.block_size,
                          model_config.num_layers, model_config.num_kv_heads, model_config.head_dim)
        super().__init__(layout=layout, num_blocks=self.runner.num_blocks, max_model_len=max_model_len,
                         vocab_size=model_config.vocab_size, eos_token_ids=model_config.eos_token_ids,
                         config=config)
        self.model_config = model_config
        self.tokenizer = _load_tokenizer(config.model)

    def execute(self, scheduled: SchedulerOutput) -> list[int]:
        logits = self.runner.run(scheduled)
        seqs = [c.seq for c in scheduled.chunks if c.samples]
        return sample(logits, [s.params for s in seqs], [s.seed for s in seqs],
                      [s.num_output_tokens for s in seqs])

    def detokenize(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            raise RuntimeError("this model folder has no tokenizer, so stop strings cannot be checked")
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def read_block_bytes(self, block_ids: list[int]) -> bytes:
        if not block_ids:
            return b""
        return self.runner.read_blocks(block_ids).view(torch.uint8).numpy().tobytes()

    def write_block_tensor(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.runner.write_blocks(block_ids, data)


def _load_tokenizer(folder: str):
    if not (Path(folder) / "tokenizer.json").is_file() and not (Path(folder) / "tokenizer.model").is_file():
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)
