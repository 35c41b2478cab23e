"""Paged attention equals dense causal attention (float64, random tensors, GQA, shuffled block tables).

The cache holds each request's K/V in blocks picked in random order, so a wrong block table, slot or
mask shows up as a numeric difference:

    positions:   0 1 2 3 | 4 5 6 7 | 8 9 ..        (block_size 4)
    block table: [b11]     [b3]      [b7] ..       (a shuffled permutation of the pool)
"""
from __future__ import annotations

import pytest
import torch

from services.engine.attention import PrefillChunk, decode_attention_reference, prefill_attention, write_kv

BLOCK_SIZE = 4
NUM_BLOCKS = 24
NUM_HEADS = 4
NUM_KV_HEADS = 2          # GQA: 2 groups of 2 query heads
HEAD_DIM = 8
SCALE = HEAD_DIM ** -0.5
DTYPE = torch.float64


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """q [n, Hq, D] at positions start_pos.., k/v [L, Hkv, D] at positions 0..L-1; naive, no SDPA."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
    query_pos = torch.arange(start_pos, start_pos + q.shape[0]).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def random_qkv(gen: torch.Generator, num_tokens: int):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DTYPE)
    return (randn(num_tokens, NUM_HEADS, HEAD_DIM), randn(num_tokens, NUM_KV_HEADS, HEAD_DIM),
            randn(num_tokens, NUM_KV_HEADS, HEAD_DIM))


def empty_cache() -> torch.Tensor:
    """One layer's cache [2, blocks, block_size, kv_heads, head_dim], filled with noise (stale KV)."""
    return torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE)


def store(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor) -> None:
    positions = torch.arange(k.shape[0])
    slots = block_table[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    write_kv(cache, k, v, slots)


@pytest.mark.parametrize("context_len, start_pos", [
    (7, 0),        # no cached prefix: plain causal SDPA
    (13, 5),       # prefix ends mid-block, chunk ends mid-block
    (16, 8),       # block-aligned prefix and end
    (9, 8),        # a one-token chunk after the prefix
    (21, 1),
])
def test_prefill_attention_with_cached_prefix_equals_dense_causal(context_len, start_pos):
    gen = torch.Generator().manual_seed(context_len * 100 + start_pos)
    q, k, v = random_qkv(gen, context_len)
    block_table = torch.randperm(NUM_BLOCKS, generator=gen)[:-(-context_len // BLOCK_SIZE)]
    cache = empty_cache()
    store(cache, k, v, block_table)     # paged_attention writes the chunk's own KV before attending
    chunk = PrefillChunk(token_start=0, num_tokens=context_len - start_pos, start_pos=start_pos,
                         block_table=block_table)
    new = slice(start_pos, context_len)

    out = prefill_attention(q[new], k[new], v[new], cache, chunk, SCALE)

    expected = dense_causal_attention(q[new], k, v, start_pos)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("context_lens", [[1], [6, 13, 1], [4, 8, 16, 5]])
def test_decode_attention_reference_equals_dense_causal(context_lens):
    gen = torch.Generator().manual_seed(sum(context_lens))
    cache = empty_cache()
    order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    max_blocks = max(-(-n // BLOCK_SIZE) for n in context_lens)
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)   # padding points at block 0
    queries, expected = [], []
    for row, n in enumerate(context_lens):
        q, k, v = random_qkv(gen, n)
        table = torch.tensor([order.pop() for _ in range(-(-n // BLOCK_SIZE))])
        store(cache, k, v, table)
        tables[row, :len(table)] = table.to(torch.int32)
        queries.append(q[-1])
        expected.append(dense_causal_attention(q[-1:], k, v, n - 1)[0])

    out = decode_attention_reference(torch.stack(queries), cache, tables,
                                     torch.tensor(context_lens, dtype=torch.int32), SCALE)

    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-10, atol=1e-10)
