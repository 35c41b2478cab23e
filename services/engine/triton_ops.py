"""Fused CUDA kernels for the elementwise parts of a decoder layer (Triton).

Unfused, RMSNorm, RoPE, the KV write and SiLU*up are ~35 tiny kernels a layer, about a third of a
Llama-3-8B decode step on an H200 (docs/benchmarks/engine.md). Fused, they are four:

    add_rms_norm   residual += x (rounded to the model dtype, as HF does), out = norm(residual) * w
    rope_write_kv  rotate q and k in place (HF "rotate half" layout), write k and v to their slots
    silu_and_mul   out = silu(gate) * up for a fused [gate | up] row
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, HAS_RESIDUAL: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * n + cols, x, mask=mask)
    x = x.to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * n + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(x + residual) with `residual` updated in place (or norm(x) when residual is None)."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(x.numel() // n,)](x, residual if residual is not None else x, weight, out, n, eps,
                                            HAS_RESIDUAL=residual is not None,
                                            BLOCK=triton.next_power_of_2(n), num_warps=8)
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    n = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(gate_up.numel() // (2 * n), triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out


@triton.jit
def _rotate(ptr, head_stride, heads, cos, sin, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    x1 = tl.load(ptr + h * head_stride + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + h * head_stride + HALF + d, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(ptr.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(ptr.dtype.element_ty)
    tl.store(ptr + h * head_stride + d, o1, mask=mask)
    tl.store(ptr + h * head_stride + HALF + d, o2, mask=mask)
    return o1, o2, h, d, mask


@triton.jit
def _rope_write_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr,
                          stride_q, stride_k, stride_v, num_heads, num_kv_heads,
                          HEAD_DIM: tl.constexpr, Q_PAD: tl.constexpr, KV_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, half)[None, :]
    cos = tl.load(cos_ptr + pos * HEAD_DIM + d)
    sin = tl.load(sin_ptr + pos * HEAD_DIM + d)
    _rotate(q_ptr + t * stride_q, HEAD_DIM, num_heads, cos, sin, Q_PAD, half)
    k1, k2, h, d, mask = _rotate(k_ptr + t * stride_k, HEAD_DIM, num_kv_heads, cos, sin, KV_PAD, half)
    slot = tl.load(slot_ptr + t)
    dst = slot * num_kv_heads * HEAD_DIM + h * HEAD_DIM + d
    tl.store(kc_ptr + dst, k1, mask=mask)
    tl.store(kc_ptr + dst + half, k2, mask=mask)
    v1 = tl.load(v_ptr + t * stride_v + h * HEAD_DIM + d, mask=mask, other=0.0)
    v2 = tl.load(v_ptr + t * stride_v + h * HEAD_DIM + half + d, mask=mask, other=0.0)
    tl.store(vc_ptr + dst, v1, mask=mask)
    tl.store(vc_ptr + dst + half, v2, mask=mask)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """q [T, Hq, D] and k [T, Hkv, D] rotated in place; k and v written to one layer's cache."""
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    _rope_write_kv_kernel[(tokens,)](
        q, k, v, positions, cos, sin, slot_mapping, kv_cache[0], kv_cache[1],
        q.stride(0), k.stride(0), v.stride(0), num_heads, num_kv_heads, HEAD_DIM=head_dim,
        Q_PAD=triton.next_power_of_2(num_heads), KV_PAD=triton.next_power_of_2(num_kv_heads), num_warps=4)
