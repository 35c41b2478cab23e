"""`ModelRunner`: owns the model weights and the KV cache tensor; turns a scheduled step into logits.

On CUDA, pure-decode steps replay a CUDA graph captured per batch size (padded rows write to a
scratch block that no request owns), so a step costs one launch instead of hundreds.
"""
from __future__ import annotations

import array

import torch

from services.engine.attention import AttentionMetadata, PrefillChunk, decode_mask
from services.engine.config import EngineConfig, ModelConfig
from services.engine.cpu_linear import can_pack, pack_linears
from services.engine.loader import init_dummy_weights, load_weights
from services.engine.model import LlamaModel, RotaryEmbedding
from services.engine.step_scheduler import SchedulerOutput

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = self._build_model()
        self.num_blocks = config.num_blocks or self._blocks_that_fit()
        # One extra block at the end: the scratch block that padded CUDA-graph rows write to.
        self.scratch_block = self.num_blocks
        self.kv_cache = torch.zeros(
            model_config.num_layers, 2, self.num_blocks + 1, self.block_size,
            model_config.num_kv_heads, model_config.head_dim, dtype=self.dtype, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        if self.device.type == "cuda" and config.cuda_graphs:
            self._capture_graphs()

    # ---- building -------------------------------------------------------------------------
    def _build_model(self) -> LlamaModel:
        with torch.device("meta"):
            model = LlamaModel(self.model_config)
        model = model.to(self.dtype).to_empty(device=self.device)
        model.rope = RotaryEmbedding(self.model_config, self.max_model_len).to(self.device)
        if self.model_config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed)
        else:
            load_weights(model, self.config.model)
        if self.device.type == "cpu" and can_pack():
            pack_linears(model)
        return model.eval()

    def _blocks_that_fit(self) -> int:
        per_block = self.model_config.kv_bytes_per_token(self.dtype) * self.block_size
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = total * self.config.gpu_memory_utilization - torch.cuda.memory_allocated(self.device)
            budget -= 2 * 2**30  # activations, logits and CUDA graphs
        else:
            budget = self.config.kv_cache_memory_gb * 2**30
        if budget < per_block * 2:
            raise ValueError(f"no memory left for the KV cache ({budget / 2**30:.2f} GiB); "
                             "lower max_model_len or raise gpu_memory_utilization / kv_cache_memory_gb")
        return int(budget // per_block)

    # ---- a step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> torch.Tensor:
        """Logits [num_sampling_chunks, vocab] (float32) for the chunks that sample, in order."""
        num_decodes = sum(1 for c in step.chunks if c.is_decode)
        if num_decodes == len(step.chunks) and num_decodes <= max(self.graphs, default=0):
            return self._replay(step)
        ids, pos, slots, sample_rows = [], [], [], []
        prefills, row = [], 0
        for chunk in step.chunks:
            seq, n = chunk.seq, chunk.num_tokens
            positions = torch.arange(chunk.start, chunk.start + n)
            table = torch.tensor(seq.block_ids[:seq.blocks_needed(chunk.start + n)])
            ids.append(torch.tensor(seq.token_ids[chunk.start:chunk.start + n]))
            pos.append(positions)
            slots.append(table[positions // self.block_size] * self.block_size + positions % self.block_size)
            if not chunk.is_decode:
                prefills.append(PrefillChunk(row, n, chunk.start, table.to(self.device, non_blocking=True)))
            row += n
            if chunk.samples:
                sample_rows.append(row - 1)
        tables, lens = self._decode_tables(step, num_decodes)
        meta = AttentionMetadata(
            slot_mapping=self._to_device(torch.cat(slots)), num_decodes=num_decodes,
            decode_block_tables=tables, decode_context_lens=lens, prefills=tuple(prefills),
            decode_num_splits=self._num_splits(num_decodes),
            decode_mask=decode_mask(tables, lens, self.block_size) if num_decodes and not tables.is_cuda else None)
        hidden = self.model(self._to_device(torch.cat(ids)), self._to_device(torch.cat(pos)),
                            self.kv_cache, meta)
        return self.model.compute_logits(hidden[self._to_device(torch.tensor(sample_rows, dtype=torch.long))])

    def _decode_tables(self, step: SchedulerOutput, num_decodes: int):
        if not num_decodes:
            return None, None
        tables = block_tables(step.chunks[:num_decodes], filler=0)
        lens = torch.tensor([c.start + 1 for c in step.chunks[:num_decodes]], dtype=torch.int32)
        return self._to_device(tables), self._to_device(lens)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _num_splits(self, batch: int) -> int:
        """Enough (request, KV head, split) programs to fill the GPU twice over; 1 on the CPU."""
        if self.device.type != "cuda" or batch == 0:
            return 1
        sms = self.num_sms
        programs = batch * self.model_config.num_kv_heads
        return max(1, min(16, -(-2 * sms // programs)))

    # ---- CUDA graphs for decode steps -----------------------------------------------------
    def _capture_graphs(self) -> None:
        max_batch = self.config.max_num_seqs
        sizes = [b for b in GRAPH_BATCH_SIZES if b < max_batch] + [max_batch]
        width = -(-self.max_model_len // self.block_size)
        dev = self.device
        # Static inputs the graphs read: rows ids | positions | slots | context lens, and block tables.
        self.g_inputs = torch.zeros(4, max_batch, dtype=torch.long, device=dev)
        self.g_ids, self.g_pos, self.g_slots, self.g_lens = self.g_inputs
        self.g_slots.fill_(self.scratch_block * self.block_size)
        self.g_lens.fill_(1)
        self.g_tables = torch.full((max_batch, width), self.scratch_block, dtype=torch.int32, device=dev)
        pool = None
        for batch in reversed(sizes):
            meta = AttentionMetadata(slot_mapping=self.g_slots[:batch], num_decodes=batch,
                                     decode_block_tables=self.g_tables[:batch],
                                     decode_context_lens=self.g_lens[:batch],
                                     decode_num_splits=self._num_splits(batch))
            with torch.inference_mode():
                self._forward_logits(batch, meta)          # warm up (Triton compiles here)
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward_logits(batch, meta)
            pool = graph.pool()
            self.graphs[batch] = (graph, logits)
        torch.cuda.synchronize(dev)

    def _forward_logits(self, batch: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self.g_ids[:batch], self.g_pos[:batch], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    def _replay(self, step: SchedulerOutput) -> torch.Tensor:
        n = len(step.chunks)
        batch = min(b for b in self.graphs if b >= n)
        pad, bs, scratch = batch - n, self.block_size, self.scratch_block
        ids, pos, slots = [], [], []
        for c in step.chunks:
            ids.append(c.seq.token_ids[c.start])
            pos.append(c.start)
            slots.append(c.seq.block_ids[c.start // bs] * bs + c.start % bs)
        lens = [p + 1 for p in pos]
        # Padding rows attend to one token of the scratch block and write there: harmless.
        # Flat arrays via the buffer protocol: ~3x cheaper than torch.tensor() on Python lists.
        rows = ids + [0] * pad + pos + [0] * pad + slots + [scratch * bs] * pad + lens + [1] * pad
        self.g_inputs[:, :batch].copy_(_int_tensor(rows, "q").view(4, batch), non_blocking=True)
        tables = block_tables(step.chunks, filler=scratch, num_pad_rows=pad)
        self.g_tables[:batch, :tables.shape[1]].copy_(tables, non_blocking=True)
        graph, logits = self.graphs[batch]
        graph.replay()
        return logits[:n]

    # ---- KV blocks in and out (export / import) --------------------------------------------
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """[n, layers, 2, block_size, kv_heads, head_dim] on the CPU."""
        idx = torch.tensor(block_ids, device=self.device, dtype=torch.long)
        return self.kv_cache.index_select(2, idx).permute(2, 0, 1, 3, 4, 5).contiguous().cpu()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, device=self.device, dtype=torch.long)
        self.kv_cache.index_copy_(2, idx, data.to(self.device, self.dtype).permute(1, 2, 0, 3, 4, 5))


def _int_tensor(values: list[int], typecode: str) -> torch.Tensor:
    """A CPU int64 ("q") or int32 ("i") tensor from a flat list, without per-element Python calls."""
    return torch.frombuffer(array.array(typecode, values), dtype=torch.int64 if typecode == "q" else torch.int32)


def block_tables(chunks, filler: int, num_pad_rows: int = 0) -> torch.Tensor:
    """[len(chunks) + num_pad_rows, widest table] int32 block tables, short rows filled with `filler`."""
    width = max(len(c.seq.block_ids) for c in chunks)
    flat: list[int] = []
    for c in chunks:
        flat += c.seq.block_ids
        flat += [filler] * (width - len(c.seq.block_ids))
    flat += [filler] * (width * num_pad_rows)
    return _int_tensor(flat, "i").view(-1, width)
