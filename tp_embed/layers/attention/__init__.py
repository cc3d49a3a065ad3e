"""Attention over packed, unpadded batches.

Sequences are packed end to end; `cu_seqlens` [B+1] marks their boundaries. Every backend computes, per
sequence and never across sequences, on q [num_tokens, heads, head_dim] and k/v [num_tokens, kv_heads, head_dim]:

    score(i, j) = q_i . k_j * scale                   (scale: head_dim ** -0.5 unless given)
    score = softcap * tanh(score / softcap)           (softcap: Gemma 2's logit soft-capping)
    score += rel_bias[h, j - i + max_seqlen - 1]      (rel_bias [heads, 2 max_seqlen - 1]: MPNet's relative bias)
    keys removed: j > i when causal; |i - j| > window (a sliding window: both sides, or the left when causal)
    out_i = softmax_j(score) v

A model calls `plan_attention` once per batch and kind of layer (the per-batch work: FlashInfer's plan, the
padded view's indices and mask) and `attn.run(q, k, v)` once per layer. Inside `GraphPlans.recording()` /
`.reusing()` (tp_embed/cuda_graphs.py) the plans are made for a CUDA graph and kept, to be planned again per replay.

`select_attention` picks the backend:
- CPU, backend "cpu_kernel" (the engine's choice when `tp_embed.kernels` compiled it), float32, head dim a
  multiple of 16: `CpuKernelAttention`, the compiled kernel, every sequence and head in one call, no padding.
- CUDA with fp16/bf16 and a head dim FlashInfer supports, flashinfer installed, backend "auto" or
  "flashinfer", and no relative bias nor window on both sides: `FlashInferAttention`, FlashInfer's ragged
  prefill (its `window_left` and soft-cap).
- Other CPU cases: `PerSequenceAttention`, one sequence at a time with no padding and no mask (a padded
  batch computes every sequence at the longest one's length); short float32 sequences as two batched
  matmuls and a softmax, longer ones with SDPA.
- Other CUDA cases (head dim 32 as in all-MiniLM-L6-v2, a relative bias, a window on both sides, backend
  "sdpa"): `PaddedSdpaAttention`, PyTorch SDPA on the batch scattered into a padded [B, heads, L, head_dim]
  view with a mask that keeps every sequence to itself.
"""

import contextlib

import torch

from tp_embed.layers.attention.cpu_kernel import CpuKernelAttention
from tp_embed.layers.attention.flashinfer import (
    FLASHINFER_HEAD_DIMS,
    FlashInferAttention,
    flashinfer_available,
    for_cuda_graph,
)
from tp_embed.layers.attention.padded_sdpa import PaddedSdpaAttention
from tp_embed.layers.attention.per_sequence import PerSequenceAttention

__all__ = ["Attention", "CpuKernelAttention", "FlashInferAttention", "GraphPlans", "GraphUnsupported",
           "PaddedSdpaAttention", "PerSequenceAttention", "flashinfer_available", "plan_attention", "select_attention"]

Attention = CpuKernelAttention | FlashInferAttention | PaddedSdpaAttention | PerSequenceAttention
_GRAPH_PLANS: list["GraphPlans | None"] = [None]  # the plans being recorded or reused, while a graph is made


class GraphUnsupported(Exception):
    """The model asked for attention a CUDA graph cannot hold (a backend other than FlashInfer, a bias)."""


class GraphPlans:
    """The attention plans of one CUDA graph. While the model runs once eagerly on the graph's static batch
    (`recording`), every `plan_attention` call makes its plan here, FlashInfer's in its CUDA-graph mode with
    `slots` sequences; while the graph is captured (`reusing`) the same calls get the same plans back, in order,
    with no host work; before each replay `replan` plans them all for the new batch (host work, outside the graph).
    `any_backend`: keep whichever backend is selected (the CPU tests' stand-in for a graph), not FlashInfer only."""

    def __init__(self, slots: int, device: torch.device, any_backend: bool = False):
        self.slots, self.device, self.any_backend = slots, device, any_backend
        self.plans: list = []
        self.next: int | None = None  # reusing: the index of the plan the next call gets

    @contextlib.contextmanager
    def recording(self):
        _GRAPH_PLANS[0] = self
        try:
            yield
        finally:
            _GRAPH_PLANS[0] = None

    @contextlib.contextmanager
    def reusing(self):
        self.next = 0
        try:
            with self.recording():
                yield
        finally:
            self.next = None

    def plan(self, cls: type, args: tuple, kwargs: dict, cu_seqlens: torch.Tensor, max_seqlen: int,
             rel_bias: torch.Tensor | None) -> Attention:
        if self.next is not None:
            attn = self.plans[self.next]
            self.next += 1
            return attn
        if rel_bias is not None:
            raise GraphUnsupported("a relative position bias is computed per batch")
        if cls is FlashInferAttention:
            attn = for_cuda_graph(FlashInferAttention(*args, **kwargs), self.slots, self.device)
        elif self.any_backend:
            attn = cls(*args, **kwargs)
        else:
            raise GraphUnsupported(f"attention runs in {cls.__name__}, not FlashInfer")
        attn.plan(cu_seqlens, max_seqlen)
        self.plans.append(attn)
        return attn

    def replan(self, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
        """Every plan for a new batch: cu_seqlens [slots + 1] on the CPU, the graph's sequences."""
        for attn in self.plans:
            attn.plan(cu_seqlens, max_seqlen)


def select_attention(device: torch.device, dtype: torch.dtype, head_dim: int, backend: str = "auto", *,
                     bias: bool = False, two_sided_window: bool = False) -> type:
    """The attention class for this device, dtype and head dim. backend: "auto", "sdpa", "flashinfer" (an
    error where FlashInfer cannot run) or "cpu_kernel" (the compiled kernel where it takes the case, else
    as "sdpa"). bias: a relative position bias; two_sided_window: a sliding window that is not causal
    (FlashInfer takes neither)."""
    if backend == "cpu_kernel" and device.type == "cpu" and dtype == torch.float32 and head_dim % 16 == 0:
        return CpuKernelAttention
    if backend not in ("sdpa", "cpu_kernel"):
        fits = (device.type == "cuda" and head_dim in FLASHINFER_HEAD_DIMS
                and dtype in (torch.float16, torch.bfloat16))
        if backend == "flashinfer":
            if not fits:
                raise ValueError(f"FlashInfer needs CUDA, fp16/bf16 and head_dim in {FLASHINFER_HEAD_DIMS}")
            if bias or two_sided_window:
                raise ValueError("FlashInfer takes neither a relative position bias nor a sliding window on both "
                                 "sides: use --attention-backend auto or sdpa for this model")
            if not flashinfer_available():
                raise ValueError("--attention-backend flashinfer: flashinfer is not installed (pip install '.[gpu]')")
            return FlashInferAttention
        if fits and not (bias or two_sided_window) and flashinfer_available():
            return FlashInferAttention
    return PerSequenceAttention if device.type == "cpu" else PaddedSdpaAttention


def plan_attention(cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   causal: bool, dtype: torch.dtype, backend: str = "auto", *, scale: float | None = None,
                   window: int | None = None, softcap: float | None = None,
                   rel_bias: torch.Tensor | None = None) -> Attention:
    """The selected backend for cu_seqlens' device, planned for this batch: call `.run(q, k, v)` per layer.
    scale, softcap, rel_bias and window as the module docstring defines them."""
    if rel_bias is not None and rel_bias.shape != (num_heads, 2 * max_seqlen - 1):
        raise ValueError(f"rel_bias must be [heads, 2 * max_seqlen - 1] = [{num_heads}, {2 * max_seqlen - 1}], "
                         f"not {list(rel_bias.shape)}")
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0, not {window}")
    recorder = _GRAPH_PLANS[0]
    device = cu_seqlens.device if recorder is None else recorder.device
    cls = select_attention(device, dtype, head_dim, backend, bias=rel_bias is not None,
                           two_sided_window=window is not None and not causal)
    args, kwargs = (num_heads, num_kv_heads, head_dim, causal, dtype), dict(scale=scale, window=window, softcap=softcap)
    if recorder is not None:
        return recorder.plan(cls, args, kwargs, cu_seqlens, max_seqlen, rel_bias)
    attn = cls(*args, **kwargs)
    attn.plan(cu_seqlens, max_seqlen, rel_bias)
    return attn
