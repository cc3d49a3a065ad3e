"""The compiled CPU kernel `torch.ops.tp_embed.varlen_attention` (tp_embed/kernels): every sequence and head
in one call, no padding. float32, head dims a multiple of 16; the engine picks it (backend "cpu_kernel")
when `tp_embed.kernels` compiled it. It takes a sliding window (on the left when causal, else both sides; it
computes only the keys inside), a relative position bias table and logit soft-capping."""

import torch


class CpuKernelAttention:
    """softmax(q k^T * scale + mask) v per sequence, in the compiled kernel."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool, dtype: torch.dtype,
                 scale: float | None = None, window: int | None = None, softcap: float | None = None):
        self.causal = causal
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.window = -1 if window is None else window
        self.softcap = 0.0 if softcap is None else softcap

    def plan(self, cu_seqlens: torch.Tensor, max_seqlen: int, rel_bias: torch.Tensor | None = None) -> None:
        self.cu_seqlens = cu_seqlens.to(torch.int64).contiguous()  # the kernel takes int64
        self.num_tokens = int(self.cu_seqlens[-1])
        self.rel_bias = None if rel_bias is None else rel_bias.float().contiguous()

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k and v may carry rows past the batch's tokens (a model that pads its rows once for the packed
        linear layers): those rows come back as zeros."""
        n, rows = self.num_tokens, q.shape[0]
        # the kernel takes rows of any stride but contiguous heads: views into a fused qkv pass without a copy
        q, k, v = (x[:n] if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x[:n].contiguous()
                   for x in (q, k, v))
        out = torch.empty((rows,) + q.shape[1:], dtype=q.dtype)
        if rows > n:
            out[n:] = 0
        torch.ops.tp_embed.varlen_attention(q, k, v, self.cu_seqlens, self.causal, self.scale, out[:n],
                                            self.window, self.softcap, self.rel_bias)
        return out
