"""Linear layers for the CPU: oneDNN with weights pre-packed once at load time.

On the 2-core AMD EPYC machines this project develops on, PyTorch's default fp32 `F.linear` (MKL
sgemm) reaches ~10 GB/s on decode-sized batches; the same weights packed for oneDNN run 2-3x faster
at every batch size from 1 to 512 (see docs/benchmarks/engine.md). This is what torch.compile's CPU
backend does with frozen weights, done here without a compiler.
"""
from __future__ import annotations

import torch
from torch import nn

PACK_FOR_BATCH = 8  # oneDNN picks a weight layout for this many rows; it was fastest for 1..512


def can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_FOR_BATCH)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias,
                                                 "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> None:
    """Swap every nn.Linear of `model` for a PackedLinear (inference only)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
