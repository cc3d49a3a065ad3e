"""Rotary position embedding (the neox / rotate-half layout that Llama, Mistral and Qwen use).

A model holds a `RotaryEmbedding` per kind of layer (its frequencies); per batch it gives a `Rope`, whose
`rotate(q, k)` every layer of that kind calls: FlashInfer's kernel in place on CUDA (layers/fused.py), else
cos/sin in the model's dtype as transformers computes them.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tp_embed.layers import fused


def rope_inv_freq(hf_config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim/2] and the cos/sin scale, from the config's rope parameters: those of `layer_type`
    where the config keeps one set per kind of layer (Gemma 3, ModernBERT: "full_attention",
    "sliding_attention"), else the config's one set.

    Scaled variants (linear, yarn, llama3, ...) come from transformers' own table, so a checkpoint with
    rope scaling gets the frequencies transformers would give it.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    kwargs = {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params, kwargs = params[layer_type], {"layer_type": layer_type}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, **kwargs)


def mrope_section(hf_config) -> list[int] | None:
    """Qwen2-VL's M-RoPE split [s_t, s_h, s_w] of the head_dim/2 frequencies, or None for plain RoPE."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return params.get("mrope_section")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype,
                 section: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_tokens, head_dim/2] for int positions [num_tokens], in float32 then cast.

    M-RoPE (Qwen2-VL): positions [3, num_tokens] hold (temporal, height, width) indices and
    section = [s_t, s_h, s_w] (summing to head_dim/2) says which axis each frequency reads: angle_i =
    p_t * f_i for i < s_t, p_h * f_i for the next s_h, p_w * f_i for the last s_w. Text tokens carry
    the same index on all three axes, which is plain RoPE.
    """
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [num_tokens, D/2] or [3, num_tokens, D/2]
    if positions.dim() == 2:
        if section is None:
            raise ValueError("positions [3, num_tokens] need the model's mrope_section")
        freqs = torch.cat([part[axis] for axis, part in enumerate(freqs.split(section, dim=-1))], dim=-1)
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, heads, head_dim]; rotates the pairs (x_i, x_{i + head_dim/2})."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """A model's rotary frequencies inv_freq [head_dim/2] with their cos/sin scale and, for M-RoPE, the section
    (`rope_cos_sin`); `max_positions` bounds the per-position table FlashInfer's kernel reads (float32
    [max_positions, head_dim]: cos | sin; built with the model on CUDA, on first use elsewhere)."""

    def __init__(self, inv_freq: torch.Tensor, scale: float = 1.0, section: list[int] | None = None,
                 max_positions: int = 0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scale, self.section, self.max_positions = scale, section, max_positions
        self._table: torch.Tensor | None = None
        if self.inv_freq.is_cuda and section is None:
            self.table()  # now, not in the engine's profiling pass, which would count it as activations

    def table(self) -> torch.Tensor:
        if self._table is None:
            positions = torch.arange(self.max_positions, dtype=torch.float32, device=self.inv_freq.device)
            freqs = positions[:, None] * self.inv_freq
            self._table = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * self.scale
        return self._table

    def forward(self, positions: torch.Tensor, max_seqlen: int, dtype: torch.dtype, rows: int | None = None) -> "Rope":
        """This batch's rotation: positions [num_tokens] (or [3, num_tokens] for M-RoPE), each below max_seqlen;
        `rows`: how many rows q and k carry when a model pads them past the tokens (oneDNN's bucketed matmuls)."""
        return Rope(self, positions, dtype, kernel=self.section is None and max_seqlen <= self.max_positions,
                    rows=rows)


class Rope:
    """One batch's rotary embedding for `rotate`. `kernel`: whether FlashInfer's kernel may take it (plain
    positions inside the table); it does where layers/fused.py says the tensors fit, else the PyTorch path."""

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype, kernel: bool,
                 rows: int | None = None):
        self.rotary, self.positions, self.dtype, self.kernel, self.rows = rotary, positions, dtype, kernel, rows

    @functools.cached_property
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [rows, head_dim/2] for the PyTorch path, once per batch: zero past the batch's tokens."""
        r = self.rotary
        cos, sin = rope_cos_sin(self.positions, r.inv_freq, r.scale, self.dtype, r.section)
        pad = (self.rows or cos.shape[0]) - cos.shape[0]
        return (cos, sin) if pad <= 0 else (F.pad(cos, (0, 0, 0, pad)), F.pad(sin, (0, 0, 0, pad)))

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [rows, heads, head_dim], k [rows, kv_heads, head_dim], turned by each token's position; rows past
        the batch's tokens come out zero. On CUDA q and k are turned in place: pass tensors nothing else reads."""
        if self.kernel and fused.rope_kernel_takes(q, k, self.positions):
            fused.rope_inplace(q, k, self.positions, self.rotary.table())
            return q, k
        cos, sin = self.cos_sin
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
