"""bge-m3's per-token heads beside its dense vector: `sparse_linear.pt` (lexical weights) and `colbert_linear.pt`
(multi-vector), as FlagEmbedding's BGEM3FlagModel computes them from the encoder's last hidden states.

    sparse:  w_t = relu(sparse_linear(h_t)), one weight per token; a text's weight for a token id is the
             largest over the id's occurrences, the tokenizer's cls, eos, pad and unk ids left out, zeros dropped
    colbert: normalize(colbert_linear(h_t)) for every token after the first ([CLS] is the dense vector)

The heads are small (hidden -> 1, hidden -> colbert dim), so a group's rank 0 holds them whole and applies
them to the batch's hidden states after the model (the workers run the model only, with no last-layer
pruning for such a batch); the result goes back one row per token and rank 0's HTTP side aggregates it per
input (`lexical_weights`; the ColBERT rows after each window's first token).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

from tp_embed.errors import ConfigError

# what a batch asks of the model (protocol.py carries it in the header): pooled rows, or one row per token
POOLED, SPARSE, COLBERT = 0, 1, 2
OUTPUTS = {"sparse": SPARSE, "colbert": COLBERT}
FILES = {SPARSE: "sparse_linear.pt", COLBERT: "colbert_linear.pt"}


class TokenHeads:
    """The heads a model directory has, float32 on rank 0's device."""

    def __init__(self, linears: dict[int, tuple[torch.Tensor, torch.Tensor | None]]):
        self.linears = linears

    @staticmethod
    def load(model_dir: str, hidden_size: int, device: torch.device) -> "TokenHeads | None":
        """None when the directory has neither file; ConfigError for one that does not fit the model."""
        linears = {}
        for kind, name in FILES.items():
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file: say which
                raise ConfigError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
            weight = state.get("weight") if isinstance(state, dict) else None
            if weight is None or weight.dim() != 2 or weight.shape[1] != hidden_size:
                shape = None if weight is None else tuple(weight.shape)
                raise ConfigError(f"{path}: expected a linear layer's weight [out, {hidden_size}], got {shape}")
            if kind == SPARSE and weight.shape[0] != 1:
                raise ConfigError(f"{path}: the sparse head gives one weight per token, not {weight.shape[0]}")
            bias = state.get("bias")
            linears[kind] = (weight.float().to(device), None if bias is None else bias.float().to(device))
        return TokenHeads(linears) if linears else None

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(name for name, kind in OUTPUTS.items() if kind in self.linears)

    def width(self, kind: int) -> int:
        return self.linears[kind][0].shape[0]

    def __call__(self, hidden: torch.Tensor, kind: int) -> torch.Tensor:
        """hidden [num_tokens, hidden] -> float32 [num_tokens, width]: relu'd weights or normalized vectors."""
        weight, bias = self.linears[kind]
        out = F.linear(hidden.float(), weight, bias)
        return torch.relu(out) if kind == SPARSE else F.normalize(out, dim=-1)


def unused_token_ids(tokenizer) -> set[int]:
    """The ids whose weight FlagEmbedding drops: the tokenizer's cls, eos, pad and unk tokens."""
    ids = (getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "eos", "pad", "unk"))
    return {i for i in ids if i is not None}


def lexical_weights(token_ids: list[int], weights: np.ndarray, unused: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """One input's sparse vector from its tokens' weights: (indices ascending, int64; values, float32), the
    largest weight of each id, unused ids and zero weights left out."""
    ids = np.asarray(token_ids, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    keep = (weights > 0) & ~np.isin(ids, list(unused))
    ids, weights = ids[keep], weights[keep]
    if not ids.size:
        return ids, weights
    order = np.lexsort((-weights, ids))  # by id, the largest weight first
    ids, weights = ids[order], weights[order]
    first = np.ones(ids.size, dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return ids[first], weights[first]


def dense_sparse(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A vocabulary-sized vector (SPLADE's) as (indices of its nonzero entries, their values)."""
    indices = np.flatnonzero(row)
    return indices.astype(np.int64), row[indices].astype(np.float32)
