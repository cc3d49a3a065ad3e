"""Normalization layers (replicated on every rank)."""

import torch
from torch import nn

from tp_embed.layers.weights import replicated_weight_loader


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.weight.weight_loader = replicated_weight_loader

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) in float32."""
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalized(x).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's: y = x / sqrt(mean(x^2) + eps) * (1 + w), the scale applied in float32 before the cast back
    (Llama's casts first, then scales by w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalized(x) * (1.0 + self.weight.float())).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose weight and bias load as replicated parameters."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
        for p in self.parameters():
            p.requires_grad_(False)
            p.weight_loader = replicated_weight_loader
