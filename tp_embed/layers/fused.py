"""Fused elementwise kernels for the decoder families on CUDA, through FlashInfer, with the PyTorch reference
everywhere else (the CPU, float32, or without FlashInfer) and as what the kernels are tested against:

    rms_norm(x, w)                    Llama's RMSNorm (Gemma's scales by 1 + w): one kernel instead of five ops
    add_rms_norm(x, residual, w)      residual <- x + residual, then its norm: one pass over both (in place on
                                      CUDA: x becomes the norm, residual the sum)
    gated_activation(gate_up, act)    act(gate) * up from the merged gate/up projection: SwiGLU, GeGLU

`--fused-ops off` (set_enabled(False)) keeps the reference on CUDA too, for comparison. Rotary embeddings stay in
PyTorch (layers/rotary.py): FlashInfer's rope kernels want a cos/sin cache per position, and M-RoPE (Qwen2-VL)
has none of its form.
"""

import functools

import torch
from transformers.activations import ACT2FN

_ENABLED = [True]
FUSED_DTYPES = (torch.bfloat16, torch.float16)
# the activations gated_activation takes, and FlashInfer's kernel for each
ACTIVATION_KERNELS = {"silu": "silu_and_mul", "gelu_pytorch_tanh": "gelu_tanh_and_mul", "gelu": "gelu_and_mul"}


def set_enabled(enabled: bool) -> None:
    """--fused-ops: whether CUDA tensors take FlashInfer's kernels (where FlashInfer is installed)."""
    _ENABLED[0] = enabled


@functools.cache
def _flashinfer():
    try:
        import flashinfer.activation
        import flashinfer.norm
    except ImportError:
        return None
    return flashinfer


def kernels_for(x: torch.Tensor):
    """FlashInfer where x may take its fused kernels (CUDA, bf16 or fp16, 2-D and contiguous), else None."""
    if not _ENABLED[0] or not x.is_cuda or x.dtype not in FUSED_DTYPES or x.dim() != 2 or not x.is_contiguous():
        return None
    return _flashinfer()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """transformers' RMSNorm: normalized in float32; Llama's casts back, then scales by w; Gemma's scales by
    (1 + w) in float32, then casts back."""
    normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (normalized * (1.0 + weight.float())).to(x.dtype)
    return weight * normalized.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    fi = kernels_for(x)
    if fi is None:
        return rms_norm_reference(x, weight, eps, gemma)
    return (fi.norm.gemma_rmsnorm if gemma else fi.norm.rmsnorm)(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm of x + residual, x + residual). On CUDA both tensors are overwritten: pass ones nothing else reads."""
    fi = kernels_for(x)
    if fi is None or residual.dtype != x.dtype or not residual.is_contiguous() or residual.shape != x.shape:
        residual = x + residual
        return rms_norm_reference(residual, weight, eps, gemma), residual
    (fi.norm.gemma_fused_add_rmsnorm if gemma else fi.norm.fused_add_rmsnorm)(x, residual, weight, eps)
    return x, residual


def gated_activation_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return ACT2FN[activation](gate) * up


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for gate_up = [gate | up] along the last dimension."""
    fi = kernels_for(gate_up)
    if fi is None:
        return gated_activation_reference(gate_up, activation)
    return getattr(fi.activation, ACTIVATION_KERNELS[activation])(gate_up)
