"""What the PyTorch backends add to the scores beyond causal: a sliding window, a relative position bias and
logit soft-capping, as one float bias per sequence length."""

import torch


def relative_bias_table(bias_of_offset, max_seqlen: int, device: torch.device) -> torch.Tensor:
    """[heads, 2 * max_seqlen - 1] float32 from bias_of_offset(offsets [2L - 1] int64, j - i from -(L - 1) to
    L - 1) -> [2L - 1, heads]: the layout `rel_bias` takes (column j - i + max_seqlen - 1)."""
    offsets = torch.arange(1 - max_seqlen, max_seqlen, device=device)
    return bias_of_offset(offsets).float().t().contiguous()


def score_bias(seq_len: int, causal: bool, window: int | None, rel_bias: torch.Tensor | None,
               device: torch.device) -> torch.Tensor | None:
    """Float [heads or 1, L, L] added to one sequence's scores: rel_bias[h, j - i + center] and -inf for the
    keys the mask removes (after the query when causal, farther than `window` from it). None when there is
    nothing to add beyond what `causal` alone gives."""
    if window is None and rel_bias is None:
        return None
    pos = torch.arange(seq_len, device=device)
    offset = pos[None, :] - pos[:, None]  # [L, L]: j - i
    if rel_bias is not None:
        center = (rel_bias.shape[1] - 1) // 2
        bias = rel_bias[:, offset + center].float()  # [heads, L, L]
    else:
        bias = torch.zeros(1, seq_len, seq_len, device=device)
    blocked = torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        blocked |= offset > 0
    if window is not None:
        blocked |= offset.abs() > window
    return bias.masked_fill(blocked, float("-inf"))


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(scores / softcap) (Gemma 2), in place, or the scores as they are."""
    if softcap is None:
        return scores
    return scores.div_(softcap).tanh_().mul_(softcap)
