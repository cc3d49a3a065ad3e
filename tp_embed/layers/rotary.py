"""Rotary position embedding (the neox / rotate-half layout that Llama, Mistral and Qwen use)."""

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


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
