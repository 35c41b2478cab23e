"""Attention over a paged KV cache.

Cache layout, one tensor for the whole model:

    kv_cache[layer, 0 = K | 1 = V, block, slot_in_block, kv_head, head_dim]

A token at position p of a request lives in block `block_table[p // block_size]`, slot
`p % block_size`; `slot_mapping` flattens that to `block * block_size + slot`.

A batch is decodes first (one query each, attending its whole context) and then prefill chunks
(queries at positions start..start+n-1, causal over everything before them, cached prefix included).
Decodes go through one batched kernel (Triton on CUDA; gather + SDPA on CPU); each prefill chunk
is one SDPA call (plain causal when it has no cached prefix).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    token_start: int          # row of the chunk's first token in the flat batch
    num_tokens: int
    start_pos: int            # position of its first token (= tokens already in the cache)
    block_table: torch.Tensor  # [num_blocks] int64, covering start_pos + num_tokens tokens

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor                # [T] int64: where each token's K/V is written
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None   # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor | None = None   # [num_decodes] int32, new token included
    prefills: tuple[PrefillChunk, ...] = field(default=())
    decode_num_splits: int = 1                # CUDA kernel's split of long contexts
    decode_mask: torch.Tensor | None = None   # CPU: [num_decodes, 1, 1, max_blocks * block_size], built once a step


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] for the batch's new tokens, already written to one layer's cache
    [2, N, bs, Hkv, D] (by `write_kv`, or fused into RoPE on CUDA)."""
    if not meta.prefills:
        return decode_attention(q, kv_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[:meta.num_decodes] = decode_attention(q[:meta.num_decodes], kv_cache, meta, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        out[rows] = prefill_attention(q[rows], k[rows], v[rows], kv_cache, chunk, scale)
    return out


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    if q.is_cuda:
        from services.engine.triton_attention import paged_decode_attention
        return paged_decode_attention(q, kv_cache, meta.decode_block_tables, meta.decode_context_lens,
                                      scale, meta.decode_num_splits)
    return decode_attention_reference(q, kv_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
                                      meta.decode_mask)


def decode_mask(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, 1, 1, max_blocks * block_size]: True where a gathered slot holds one of the request's tokens."""
    positions = torch.arange(block_tables.shape[1] * block_size, device=context_lens.device)
    return (positions.unsqueeze(0) < context_lens.unsqueeze(1)).view(len(context_lens), 1, 1, -1)


def gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """K and V of `block_ids` as [2, n * block_size, kv_heads, head_dim] (index_select: ~4x cheaper
    than advanced indexing on the CPU)."""
    _, num_blocks, _, num_kv_heads, head_dim = kv_cache.shape
    rows = kv_cache.view(2, num_blocks, -1).index_select(1, block_ids.reshape(-1).long())
    return rows.view(2, -1, num_kv_heads, head_dim)


def decode_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float,
                               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gather every request's blocks and run one masked SDPA: [B, Hq, 1, D] over [B, Hkv, L, D]."""
    batch = block_tables.shape[0]
    if mask is None:
        mask = decode_mask(block_tables, context_lens, kv_cache.shape[2])
    kv = gather_blocks(kv_cache, block_tables)
    keys, values = (t.view(batch, -1, *t.shape[1:]).transpose(1, 2) for t in kv)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """Causal attention for one chunk; a chunk after cached tokens reads them from its blocks."""
    if chunk.start_pos == 0:
        if q.is_cuda:   # the flash kernel wants equal head counts; repeating K/V is cheap next to it
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # 4-D [1, heads, tokens, dim]: the flash kernels take nothing else.
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=not q.is_cuda)
        return out[0].transpose(0, 1)
    n = chunk.context_len
    keys, values = (t[:n].transpose(0, 1) for t in gather_blocks(kv_cache, chunk.block_table))
    query_pos = torch.arange(chunk.start_pos, n, device=q.device).unsqueeze(1)
    mask = torch.arange(n, device=q.device).unsqueeze(0) <= query_pos           # [num_tokens, n]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.transpose(0, 1)
