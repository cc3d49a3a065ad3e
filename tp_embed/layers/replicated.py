"""Layers held whole on every rank: small tables and projections every rank needs all of."""

import torch
import torch.nn.functional as F
from torch import nn

from tp_embed.layers.weights import replicated_weight_loader


def replicated_parameter(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = replicated_weight_loader
    return param


class ReplicatedEmbedding(nn.Embedding):
    """nn.Embedding loaded whole on every rank (position and token-type tables)."""

    def __init__(self, num: int, dim: int):
        super().__init__(num, dim)
        self.weight.requires_grad_(False)
        self.weight.weight_loader = replicated_weight_loader


class ReplicatedLinear(nn.Module):
    """Y = XA + b, A whole on every rank (output projections and heads: small, and every rank needs all of Y)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.weight = replicated_parameter(output_size, input_size)
        self.bias = replicated_parameter(output_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
