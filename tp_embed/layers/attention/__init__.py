"""Attention over packed, unpadded batches.

Sequences are packed end to end; `cu_seqlens` [B+1] marks their boundaries. Every backend computes
softmax(q k^T * scale + mask) v per sequence, the mask causal or none and never across sequences, on
q [num_tokens, heads, head_dim] and k/v [num_tokens, kv_heads, head_dim]. A model calls `plan_attention`
once per batch (the per-batch work: FlashInfer's plan, the padded view's indices and mask) and
`attn.run(q, k, v)` once per layer.

`select_attention` picks the backend:
- CPU, backend "cpu_kernel" (the engine's choice when `tp_embed.kernels` compiled it), float32, head dim a
  multiple of 16: `CpuKernelAttention`, the compiled kernel, every sequence and head in one call, no padding.
- CUDA with fp16/bf16 and a head dim FlashInfer supports, flashinfer installed, backend "auto" or
  "flashinfer": `FlashInferAttention`, FlashInfer's ragged prefill.
- Other CPU cases: `PerSequenceAttention`, one sequence at a time with no padding and no mask (a padded
  batch computes every sequence at the longest one's length); short float32 sequences as two batched
  matmuls and a softmax, longer ones with SDPA.
- Other CUDA cases (head dim 32 as in all-MiniLM-L6-v2, backend "sdpa"): `PaddedSdpaAttention`, PyTorch
  SDPA on the batch scattered into a padded [B, heads, L, head_dim] view with a mask that keeps every
  sequence to itself.
"""

import torch

from tp_embed.layers.attention.cpu_kernel import CpuKernelAttention
from tp_embed.layers.attention.flashinfer import FLASHINFER_HEAD_DIMS, FlashInferAttention, flashinfer_available
from tp_embed.layers.attention.padded_sdpa import PaddedSdpaAttention
from tp_embed.layers.attention.per_sequence import PerSequenceAttention

__all__ = ["Attention", "CpuKernelAttention", "FlashInferAttention", "PaddedSdpaAttention", "PerSequenceAttention",
           "flashinfer_available", "plan_attention", "select_attention"]

Attention = CpuKernelAttention | FlashInferAttention | PaddedSdpaAttention | PerSequenceAttention


def select_attention(device: torch.device, dtype: torch.dtype, head_dim: int, backend: str = "auto") -> type:
    """The attention class for this device, dtype and head dim. backend: "auto", "sdpa", "flashinfer" (an
    error where FlashInfer cannot run) or "cpu_kernel" (the compiled kernel where it takes the case, else
    as "sdpa")."""
    if backend == "cpu_kernel" and device.type == "cpu" and dtype == torch.float32 and head_dim % 16 == 0:
        return CpuKernelAttention
    if backend not in ("sdpa", "cpu_kernel"):
        fits = (device.type == "cuda" and head_dim in FLASHINFER_HEAD_DIMS
                and dtype in (torch.float16, torch.bfloat16))
        if backend == "flashinfer":
            if not fits:
                raise ValueError(f"FlashInfer needs CUDA, fp16/bf16 and head_dim in {FLASHINFER_HEAD_DIMS}")
            if not flashinfer_available():
                raise ValueError("--attention-backend flashinfer: flashinfer is not installed (pip install '.[gpu]')")
            return FlashInferAttention
        if fits and flashinfer_available():
            return FlashInferAttention
    return PerSequenceAttention if device.type == "cpu" else PaddedSdpaAttention


def plan_attention(cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   causal: bool, dtype: torch.dtype, backend: str = "auto") -> Attention:
    """The selected backend for cu_seqlens' device, planned for this batch: call `.run(q, k, v)` per layer."""
    attn = select_attention(cu_seqlens.device, dtype, head_dim, backend)(num_heads, num_kv_heads, head_dim,
                                                                         causal, dtype)
    attn.plan(cu_seqlens, max_seqlen)
    return attn
