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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose weight and bias load as replicated parameters."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
        for p in self.parameters():
            p.requires_grad_(False)
            p.weight_loader = replicated_weight_loader
