"""PyTorch SDPA on the packed batch scattered into a padded [B, heads, L, head_dim] view, with a mask that
keeps every sequence to itself (and causal where asked). CUDA cases FlashInfer does not take, such as
all-MiniLM-L6-v2's head dim 32."""

import torch
import torch.nn.functional as F

from tp_embed.layers.attention.per_sequence import attend_one


class PaddedSdpaAttention:
    """softmax(q k^T * scale + mask) v on the padded batch; mask is causal or none, never across sequences."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool, dtype: torch.dtype,
                 scale: float | None = None):
        self.causal = causal
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.enable_gqa = num_heads != num_kv_heads

    def plan(self, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
        device = cu_seqlens.device
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.num_seqs = lens.numel()
        self.max_seqlen = max_seqlen
        if self.num_seqs == 1:  # nothing to pad: `run` attends the one sequence as it is
            self.seq_idx = self.pos_idx = self.mask = None
            return
        # token t of the packed batch sits at (seq_idx[t], pos_idx[t]) of the padded view
        self.seq_idx = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), lens)
        self.pos_idx = torch.arange(self.seq_idx.numel(), device=device) - cu_seqlens[:-1].long()[self.seq_idx]
        ar = torch.arange(max_seqlen, device=device)
        mask = (ar[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, L]: keys inside the sequence
        if self.causal:
            mask = mask & (ar[None, :] <= ar[:, None])[None, None]  # [B, 1, L, L]
        self.mask = mask

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, heads, head_dim], k/v [num_tokens, kv_heads, head_dim] -> [num_tokens, heads, head_dim]."""
        if self.num_seqs == 1:
            return attend_one(q, k, v, self.causal, self.scale)
        padded = [_pad(x, self.seq_idx, self.pos_idx, self.num_seqs, self.max_seqlen) for x in (q, k, v)]
        o = F.scaled_dot_product_attention(*padded, attn_mask=self.mask, scale=self.scale,
                                           enable_gqa=self.enable_gqa)  # [B, heads, L, head_dim]
        return o.transpose(1, 2)[self.seq_idx, self.pos_idx]


def _pad(x: torch.Tensor, seq_idx: torch.Tensor, pos_idx: torch.Tensor, num_seqs: int,
         max_seqlen: int) -> torch.Tensor:
    """[num_tokens, heads, head_dim] -> [B, heads, L, head_dim], zeros past each sequence's end."""
    padded = x.new_zeros(num_seqs, max_seqlen, x.shape[1], x.shape[2])
    padded[seq_idx, pos_idx] = x
    return padded.transpose(1, 2)
