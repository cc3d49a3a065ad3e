"""One sequence at a time: no padding and no mask (a padded batch computes every sequence at the longest
one's length). Short float32 sequences on the CPU take two batched matmuls and a softmax, longer ones SDPA.
A sliding window or a relative position bias enters as a float bias, built once per batch at the longest
length (a shorter sequence's is its top-left corner, the bias depending on j - i only); soft-capping computes
the scores explicitly (SDPA has no soft-cap)."""

import itertools

import torch
import torch.nn.functional as F

from tp_embed.layers.attention.mask import score_bias, softcapped

# CPU float32: a sequence with L x head_dim at most this takes two matmuls and a softmax instead of SDPA
# (at 12 heads of 32: 1.4x faster at L = 117, 1.1x at 256, slower from 384; at 32 heads of 128, causal:
# faster at 64, slower at 256)
SHORT_SEQUENCE_ELEMENTS = 8192


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
               softcap: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale (soft-capped) + bias + mask) v for one sequence: q [L, heads, head_dim], k/v
    [L, kv_heads, head_dim] -> [L, heads, head_dim]. softcap as `plan_attention` takes it; bias, where a window
    or a relative bias asks for one, is `score_bias` at this length or longer (its top-left [L, L] is used), and
    holds the causal mask too."""
    seq_len, num_heads, head_dim = q.shape
    if bias is not None:
        bias = bias[:, :seq_len, :seq_len]
    if softcap is not None or (bias is None and q.device.type == "cpu" and q.dtype == torch.float32
                               and num_heads == k.shape[1] and seq_len * head_dim <= SHORT_SEQUENCE_ELEMENTS):
        # explicit scores: two batched matmuls over the heads beat SDPA's flash kernel on short sequences,
        # and soft-capping needs the scores themselves
        group = num_heads // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dtype = q.dtype
        if dtype != torch.float32:  # bf16/fp16 scores in float32, as SDPA accumulates
            q, k, v = q.float(), k.float(), v.float()
        scores = softcapped(torch.bmm(q.transpose(0, 1), k.permute(1, 2, 0)).mul_(scale), softcap)  # [heads, L, L]
        if bias is not None:
            scores += bias
        elif causal:
            scores.masked_fill_(torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu_(1),
                                float("-inf"))
        return torch.bmm(scores.softmax(-1), v.transpose(0, 1)).transpose(0, 1).to(dtype)  # [L, heads, head_dim]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None],
                                       attn_mask=None if bias is None else bias[None].to(q.dtype),
                                       is_causal=causal and bias is None, scale=scale,
                                       enable_gqa=num_heads != k.shape[1])  # [1, heads, L, head_dim]
    return o[0].transpose(0, 1)


class PerSequenceAttention:
    """softmax(q k^T * scale + mask) v, one sequence of the packed batch at a time."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool, dtype: torch.dtype,
                 scale: float | None = None, window: int | None = None, softcap: float | None = None):
        self.causal = causal
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.window, self.softcap = window, softcap

    def plan(self, cu_seqlens: torch.Tensor, max_seqlen: int, rel_bias: torch.Tensor | None = None) -> None:
        self.bounds = cu_seqlens.tolist()  # once per batch: the host reads no tensor per layer
        self.bias = score_bias(max_seqlen, self.causal, self.window, rel_bias, cu_seqlens.device)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k and v may carry rows past the batch's tokens (a model that pads its rows once for the packed
        linear layers): those rows come back as zeros."""
        bounds, extras = self.bounds, (self.softcap, self.bias)
        if len(bounds) == 2 and bounds[1] == q.shape[0]:
            return attend_one(q, k, v, self.causal, self.scale, *extras)
        out = torch.empty_like(q)
        if q.shape[0] > bounds[-1]:
            out[bounds[-1]:] = 0
        for start, end in itertools.pairwise(bounds):
            out[start:end] = attend_one(q[start:end], k[start:end], v[start:end], self.causal, self.scale, *extras)
        return out
