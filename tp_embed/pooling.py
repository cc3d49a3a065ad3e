"""Pooling, Matryoshka truncation and normalization: pure functions of (hidden, cu_seqlens)."""

import torch
import torch.nn.functional as F


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [num_tokens, hidden] of a packed batch -> [num_seqs, hidden] in float32.

    last: the final token of each sequence (the EOS that decoder embedders append);
    cls: the first token; mean: the average over each sequence's tokens.
    """
    cu = cu_seqlens.long()
    if mode == "last":
        return hidden[cu[1:] - 1].float()
    if mode == "cls":
        return hidden[cu[:-1]].float()
    if mode == "mean":
        lens = cu[1:] - cu[:-1]
        seq_idx = torch.repeat_interleave(torch.arange(lens.numel(), device=hidden.device), lens)
        sums = torch.zeros(lens.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, seq_idx, hidden.float())
        return sums / lens[:, None].float()
    raise ValueError(f"unknown pooling mode {mode!r}; use last, mean or cls")


def truncate_and_normalize(vectors: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka: keep the first `dimensions` components, then L2-normalize if asked."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalize:
        vectors = F.normalize(vectors, p=2, dim=-1)
    return vectors


class MatryoshkaError(ValueError):
    pass


def check_dimensions(dimensions: int | None, hidden_size: int, matryoshka_dimensions: list[int] | None,
                     is_matryoshka: bool) -> None:
    """SGLang's rules: with `is_matryoshka` any 1 <= d <= hidden; with a `matryoshka_dimensions` list, d
    must be in it; a model that declares neither does not accept `dimensions`."""
    if dimensions is None:
        return
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise MatryoshkaError(f"dimensions must be an integer, got {dimensions!r}")
    if is_matryoshka:
        if not 1 <= dimensions <= hidden_size:
            raise MatryoshkaError(f"dimensions must be between 1 and {hidden_size}, got {dimensions}")
        return
    if matryoshka_dimensions:
        if dimensions not in matryoshka_dimensions:
            raise MatryoshkaError(f"dimensions {dimensions} is not supported by this model; "
                                  f"supported: {sorted(matryoshka_dimensions)}")
        return
    if dimensions != hidden_size:
        raise MatryoshkaError(f"this model does not support Matryoshka dimensions (its config has neither "
                              f"matryoshka_dimensions nor is_matryoshka); dimensions must be omitted or equal "
                              f"{hidden_size}")


def combine_windows(rows: torch.Tensor, counts: list[int], lengths: list[int], mode: str) -> torch.Tensor:
    """One vector per input from its windows' pooled rows (--long-inputs chunk), before normalization.

    rows [sum(counts), dim] holds each input's windows in order, counts[i] of them for input i, lengths[j]
    tokens in window j. mean: the token-weighted mean of the windows' means, which is the mean over every
    token embedded; last: the token-weighted mean too (each window's last token summarizes that window, and
    a longer window holds more of the text); cls: the first window's, the one that starts where the model
    was trained to read.
    """
    if mode not in ("mean", "last", "cls"):
        raise ValueError(f"chunked inputs are combined for mean, last or cls pooling, not {mode!r}")
    counts_t = torch.tensor(counts, dtype=torch.long)
    if mode == "cls":
        firsts = torch.cumsum(counts_t, 0) - counts_t
        return rows[firsts]
    weights = torch.tensor(lengths, dtype=torch.float32)[:, None]
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
    sums = torch.zeros(len(counts), rows.shape[1], dtype=torch.float32).index_add_(0, owner, rows.float() * weights)
    totals = torch.zeros(len(counts), dtype=torch.float32).index_add_(0, owner, weights[:, 0])
    return sums / totals[:, None]
