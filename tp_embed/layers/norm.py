"""Normalization layers (replicated on every rank)."""

import torch
from torch import nn

from tp_embed.layers.fused import add_rms_norm, rms_norm
from tp_embed.layers.weights import replicated_weight_loader


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 as transformers does (layers/fused.py: one
    FlashInfer kernel on CUDA)."""
    gemma = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.weight.weight_loader = replicated_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.gemma)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm of x + residual, x + residual): the residual stream's add fused with the next norm. x and
        residual may be overwritten (on CUDA), so pass tensors nothing else reads."""
        return add_rms_norm(x, residual, self.weight, self.eps, self.gemma)


class GemmaRMSNorm(RMSNorm):
    """Gemma's: y = x / sqrt(mean(x^2) + eps) * (1 + w), the scale applied in float32 before the cast back
    (Llama's casts first, then scales by w)."""
    gemma = True


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose weight and bias load as replicated parameters."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
        for p in self.parameters():
            p.requires_grad_(False)
            p.weight_loader = replicated_weight_loader
