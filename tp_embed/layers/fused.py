"""Fused elementwise kernels for the decoder families on CUDA, through FlashInfer, with the PyTorch reference
everywhere else (the CPU, float32, or without FlashInfer) and as what the kernels are tested against:

    rms_norm(x, w)                    Llama's RMSNorm (Gemma's scales by 1 + w): one kernel instead of five ops
    add_rms_norm(x, residual, w)      residual <- x + residual, then its norm: one pass over both (in place on
                                      CUDA: x becomes the norm, residual the sum)
    gated_activation(gate_up, act)    act(gate) * up from the merged gate/up projection: SwiGLU, GeGLU
    rope_inplace(q, k, positions, t)  rotary embedding of q and k in place, one kernel for both (layers/rotary.py's
                                      Rope decides when: plain positions, not M-RoPE; its table per position)

`--fused-ops off` (set_enabled(False)) keeps the reference on CUDA too, for comparison.
"""

import functools

import torch
from transformers.activations import ACT2FN

_ENABLED = [True]
FUSED_DTYPES = (torch.bfloat16, torch.float16)
ROPE_HEAD_DIMS = (64, 128, 256, 512)  # FlashInfer's rotary kernel is specialised for these
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
        import flashinfer.rope
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


def rope_kernel_takes(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether `rope_inplace` can turn q [n, heads, D] and k [n, kv_heads, D]: CUDA, bf16/fp16, a head dim the
    kernel is built for, positions [n], and each token's heads contiguous (views of a qkv projection are)."""
    if not _ENABLED[0] or not q.is_cuda or q.dtype not in FUSED_DTYPES or k.dtype != q.dtype:
        return False
    if positions.dim() != 1 or positions.shape[0] != q.shape[0] or q.shape[-1] != k.shape[-1]:
        return False
    if q.shape[-1] not in ROPE_HEAD_DIMS:
        return False
    heads_contiguous = all(t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (q, k))
    return heads_contiguous and _flashinfer() is not None


def rope_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> None:
    """FlashInfer's rotary kernel (the rotate-half layout) on q and k in place, where `rope_kernel_takes` them:
    token i turns by row positions[i] of `table`, float32 [max_positions, D] holding cos | sin (the attention
    scaling folded in); the math is float32, rounded once to q's dtype."""
    _flashinfer().rope.apply_rope_with_cos_sin_cache_inplace(
        positions, q.view(q.shape[0], -1), k.view(k.shape[0], -1), q.shape[-1], table, is_neox=True)
