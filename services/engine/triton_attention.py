"""Paged decode attention on CUDA: a split-K ("flash-decoding") Triton kernel.

Each program owns one (request, KV head, split): it walks its share of the request's context in
tiles of TILE tokens, gathering each token's K/V through the block table, and keeps an online
softmax for all the query heads of its GQA group at once (so K/V are read from HBM once per group):

    context (ctx tokens) : |----- split 0 -----|----- split 1 -----|-- split 2 --|
    tile (TILE tokens)   : |t0|t1|t2|...
    token i of a tile    : block_table[i // block_size] * block_size + i % block_size

A second tiny kernel merges the splits' (max, sum, acc). Splitting keeps the GPU busy at batch 1
with long contexts; the split count is fixed per CUDA graph, and empty splits are harmless.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, ml_ptr, scale,
                         stride_q_t, stride_q_h, stride_kv_b, stride_kv_s, stride_kv_h, stride_tab,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         PRECISION: tl.constexpr):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + req)
    num_tiles = tl.cdiv(ctx, TILE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    first = split * tiles_per_split * TILE
    last = tl.minimum(first + tiles_per_split * TILE, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + req * stride_q_t + heads[:, None] * stride_q_h + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(first, last, TILE):
        tok = start + tl.arange(0, TILE)
        valid = tok < last
        block = tl.load(tables_ptr + req * stride_tab + tok // BLOCK_SIZE, mask=valid, other=0)
        row = block.to(tl.int64) * stride_kv_b + (tok % BLOCK_SIZE) * stride_kv_s + kv_head * stride_kv_h
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    out_row = (req * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
    tl.store(acc_ptr + out_row[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < GROUP)[:, None])
    tl.store(ml_ptr + out_row * 2, m, mask=g < GROUP)
    tl.store(ml_ptr + out_row * 2 + 1, l, mask=g < GROUP)


@triton.jit
def _merge_splits_kernel(acc_ptr, ml_ptr, out_ptr, stride_o_t, stride_o_h, num_heads,
                         HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    req = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    base = (req * num_heads + head) * NUM_SPLITS
    m = tl.load(ml_ptr + (base + s) * 2)
    l = tl.load(ml_ptr + (base + s) * 2 + 1)
    acc = tl.load(acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :])
    m_max = tl.max(m, axis=0)
    w = tl.where(l > 0, tl.exp(m - m_max), 0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.maximum(tl.sum(l * w, axis=0), 1e-30)
    tl.store(out_ptr + req * stride_o_t + head * stride_o_h + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, num_splits: int = 1) -> torch.Tensor:
    """q [B, Hq, D]; kv_cache [2, N, block_size, Hkv, D]; returns [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    num_splits = triton.next_power_of_2(max(num_splits, 1))
    acc = torch.empty(batch * num_heads * num_splits, head_dim, device=q.device, dtype=torch.float32)
    ml = torch.empty(batch * num_heads * num_splits, 2, device=q.device, dtype=torch.float32)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, ml, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=64, NUM_SPLITS=num_splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    _merge_splits_kernel[(batch, num_heads)](acc, ml, out, out.stride(0), out.stride(1), num_heads,
                                             HEAD_DIM=head_dim, NUM_SPLITS=num_splits)
    return out
