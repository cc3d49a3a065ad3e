"""A tiny random bge-m3: tests/tiny_models.py's XLM-RoBERTa (CLS pooling, normalized) with FlagEmbedding's head
files beside it, `sparse_linear.pt` (hidden -> 1) and `colbert_linear.pt` (hidden -> COLBERT_DIM), and the
reference outputs of FlagEmbedding's BGEM3FlagModel."""

import os

import numpy as np
import torch

import tiny_models as tm

HIDDEN = 64
COLBERT_DIM = 48  # not the hidden size, so a head read at the wrong width fails


def make_bge_m3(path: str, seed: int = 0, colbert: bool = True, sparse: bool = True) -> str:
    tm.make_xlm_roberta(path, seed=seed, hidden_size=HIDDEN)
    gen = torch.Generator().manual_seed(seed + 100)
    if sparse:
        weight = torch.randn(1, HIDDEN, generator=gen) * 0.25
        # the bias puts the median token at zero, so relu leaves about half of the tokens at exactly zero (a
        # random model's states share most of their direction: a bias picked blind zeroes all or none)
        scores = token_states(path) @ weight[0]
        torch.save({"weight": weight, "bias": -scores.median().reshape(1)}, os.path.join(path, "sparse_linear.pt"))
    if colbert:
        torch.save({"weight": torch.randn(COLBERT_DIM, HIDDEN, generator=gen) * 0.2,
                    "bias": torch.randn(COLBERT_DIM, generator=gen) * 0.1}, os.path.join(path, "colbert_linear.pt"))
    return path


def token_states(path: str) -> torch.Tensor:
    """transformers' last hidden states of every token of MIXED_TEXTS, [tokens, hidden]."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0] for t in tm.MIXED_TEXTS])


def flag_reference(path: str, texts: list[str], max_length: int = tm.MAX_SEQ_LENGTH) -> dict:
    """BGEM3FlagModel(path).encode(texts, return_dense, return_sparse, return_colbert_vecs) in float32 on the CPU:
    {"dense": [n, hidden], "sparse": [{token id: weight}], "colbert": [[tokens - 1, dim]]}."""
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(path, use_fp16=False, devices="cpu", colbert_dim=COLBERT_DIM)
    out = model.encode(texts, batch_size=4, max_length=max_length, return_dense=True, return_sparse=True,
                       return_colbert_vecs=True)
    sparse = [{int(k): float(v) for k, v in weights.items()} for weights in out["lexical_weights"]]
    return {"dense": np.asarray(out["dense_vecs"], dtype=np.float32), "sparse": sparse,
            "colbert": [np.asarray(c, dtype=np.float32) for c in out["colbert_vecs"]]}
