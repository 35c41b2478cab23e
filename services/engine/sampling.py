"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, with a per-request seed.

Randomness is counter-based: the noise for a request's n-th output token comes from a generator
seeded with (seed, n). The sampling state is therefore just `(seed, num_output_tokens)`, which a KV
export carries, so a request that moves to another worker samples exactly what it would have.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None          # None: the whole vocabulary
    seed: int | None = None           # None: the engine picks one (and exports it)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or None, got {self.top_k}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit generator seed for the `step`-th token of a request seeded `seed`."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
           steps: list[int]) -> list[int]:
    """One token per row of `logits` [B, vocab] (float32)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        sampled = _sample_rows(logits[idx], [params[i] for i in rows],
                               [step_seed(seeds[i], steps[i]) for i in rows])
        tokens[idx] = sampled
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    logits = logits / temps.unsqueeze(1)
    if any(p.top_k is not None or p.top_p < 1 for p in params):
        logits = _mask_top_k_top_p(logits, params)
    probs = torch.softmax(logits, dim=-1)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p, one generator per row.
    noise = torch.empty_like(probs)
    for row, seed in enumerate(seeds):
        gen = torch.Generator(device=probs.device)
        gen.manual_seed(seed)
        noise[row].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def _mask_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)   # renormalised after top-k
    # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
