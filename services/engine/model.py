"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

One forward takes a flat batch of tokens from many requests (decodes first, then prefill chunks);
`AttentionMetadata` says where each token's KV goes and what each query attends to. Projections are
fused (q|k|v and gate|up) so a layer is four matrix products.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from services.engine.attention import AttentionMetadata, paged_attention, write_kv
from services.engine.config import ModelConfig

try:  # fused CUDA kernels; absent on CPU-only installs, where the torch code below runs
    from services.engine import triton_ops
except ImportError:
    triton_ops = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual)."""
        if x.is_cuda and triton_ops is not None:
            out = triton_ops.add_rms_norm(x, residual, self.weight, self.eps)   # residual updated in place
            return out if residual is None else (out, residual)
        if residual is not None:
            x = residual = x + residual
        if x.dtype == torch.float32:    # one fused op; HF's formula below is the same in float32
            out = nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            out = self.weight * x32.to(x.dtype)
        return out if residual is None else (out, residual)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once in float32 (the HF "rotate half" layout)."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> Rotation:
        """This step's rotation, gathered once for all layers."""
        if positions.is_cuda:       # the fused CUDA kernel reads the tables itself
            return Rotation(positions, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1).to(dtype)         # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        half = sin.shape[-1] // 2
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): one cat instead of four ops
        return Rotation(positions, self.cos, self.sin, cos, torch.cat((-sin[..., :half], sin[..., half:]), -1))


@dataclass(frozen=True, slots=True)
class Rotation:
    positions: torch.Tensor
    cos_table: torch.Tensor               # [max_positions, D] float32
    sin_table: torch.Tensor
    cos: torch.Tensor | None = None       # [T, 1, D] in the model dtype (CPU path)
    signed_sin: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """HF's x * cos + rotate_half(x) * sin, for x [T, heads, D]."""
        half = x.shape[-1] // 2
        return x * self.cos + torch.cat((x[..., half:], x[..., :half]), -1) * self.signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rot: Rotation, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if x.is_cuda and triton_ops is not None:
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            triton_ops.rope_write_kv(q, k, v, rot.positions, rot.cos_table, rot.sin_table, kv_cache,
                                     meta.slot_mapping)
        else:   # q and k are adjacent in qkv: rotate them together
            qk = rot.apply(qkv[:, :self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                                     self.head_dim))
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
            write_kv(kv_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if x.is_cuda and triton_ops is not None:
            return self.down_proj(triton_ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rot, kv_cache, meta):
        """(mlp output, residual stream); the next layer's norm adds them (fused on CUDA)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rot, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Embedding(nn.Module):
    """Token embedding without nn.Embedding's random init (which costs seconds even on "meta")."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope: RotaryEmbedding | None = None     # set by the runner, on its device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm; `kv_cache` is [layers, 2, blocks, ...]."""
        x, residual = self.embed_tokens(input_ids), None
        rot = self.rope.at(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rot, kv_cache[i], meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
