"""PyTorch SDPA on the packed batch scattered into a padded [B, heads, L, head_dim] view, with a mask that
keeps every sequence to itself (and causal where asked). CUDA cases FlashInfer does not take: all-MiniLM-L6-v2's
head dim 32, a relative position bias (MPNet), a window on both sides (ModernBERT, EmbeddingGemma); those
two enter as a float mask. Soft-capping computes the scores explicitly (SDPA has no soft-cap)."""

import torch
import torch.nn.functional as F

from tp_embed.layers.attention.mask import score_bias, softcapped
from tp_embed.layers.attention.per_sequence import attend_one


class PaddedSdpaAttention:
    """softmax(q k^T * scale + mask) v on the padded batch; never across sequences."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool, dtype: torch.dtype,
                 scale: float | None = None, window: int | None = None, softcap: float | None = None):
        self.causal = causal
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.window, self.softcap = window, softcap
        self.group = num_heads // num_kv_heads

    def plan(self, cu_seqlens: torch.Tensor, max_seqlen: int, rel_bias: torch.Tensor | None = None) -> None:
        device = cu_seqlens.device
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.num_seqs = lens.numel()
        self.max_seqlen = max_seqlen
        self.bias = score_bias(max_seqlen, self.causal, self.window, rel_bias, device)  # [heads or 1, L, L]
        if self.num_seqs == 1:  # nothing to pad: `run` attends the one sequence as it is
            self.seq_idx = self.pos_idx = self.mask = None
            return
        # token t of the packed batch sits at (seq_idx[t], pos_idx[t]) of the padded view
        self.seq_idx = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), lens)
        self.pos_idx = torch.arange(self.seq_idx.numel(), device=device) - cu_seqlens[:-1].long()[self.seq_idx]
        ar = torch.arange(max_seqlen, device=device)
        mask = (ar[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, L]: keys inside the sequence
        if self.bias is not None:  # a float mask: the bias, -inf past each sequence's end
            self.mask = self.bias[None].masked_fill(~mask, float("-inf"))
        elif self.causal:
            self.mask = mask & (ar[None, :] <= ar[:, None])[None, None]  # [B, 1, L, L]
        else:
            self.mask = mask

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, heads, head_dim], k/v [num_tokens, kv_heads, head_dim] -> [num_tokens, heads, head_dim]."""
        if self.num_seqs == 1:
            return attend_one(q, k, v, self.causal, self.scale, self.softcap, self.bias)
        q, k, v = (_pad(x, self.seq_idx, self.pos_idx, self.num_seqs, self.max_seqlen) for x in (q, k, v))
        mask = self.mask if self.mask.dtype == torch.bool else self.mask.to(q.dtype)
        if self.softcap is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.group > 1)  # [B, heads, L, head_dim]
        else:
            if self.group > 1:
                k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
            # in float32, as SDPA accumulates
            scores = softcapped(q.float() @ k.float().transpose(-1, -2) * self.scale, self.softcap)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
            o = (scores.softmax(-1) @ v.float()).to(q.dtype)
        return o.transpose(1, 2)[self.seq_idx, self.pos_idx]


def _pad(x: torch.Tensor, seq_idx: torch.Tensor, pos_idx: torch.Tensor, num_seqs: int,
         max_seqlen: int) -> torch.Tensor:
    """[num_tokens, heads, head_dim] -> [B, heads, L, head_dim], zeros past each sequence's end."""
    padded = x.new_zeros(num_seqs, max_seqlen, x.shape[1], x.shape[2])
    padded[seq_idx, pos_idx] = x
    return padded.transpose(1, 2)
