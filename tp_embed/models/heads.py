"""Scoring and classification heads shared by the families: what a *ForSequenceClassification checkpoint's
config says about its labels and activation, and the small replicated layers the heads are made of.

A head runs on every rank on the pooled rows only (a few rows of hidden_size), so it is held whole on every
rank rather than sharded: sharding it would cost an all-reduce for a matmul of a few kilobytes.
"""

import torch
from torch import nn

from tp_embed.config import HeadConfig
from tp_embed.errors import ConfigError
from tp_embed.layers.replicated import ReplicatedLinear
from tp_embed.layers.weights import loaded_shape

# sentence-transformers' CrossEncoder saves its activation by class name in config.json
ST_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Softmax": "softmax"}


def st_activation(raw: dict, name: str) -> str | None:
    """The activation sentence-transformers' CrossEncoder applies to this checkpoint, if config.json says
    (`sentence_transformers.activation_fn`, or the older `sbert_ce_default_activation_function`)."""
    path = (raw.get("sentence_transformers") or {}).get("activation_fn") or raw.get(
        "sbert_ce_default_activation_function")
    if not path:
        return None
    activation = ST_ACTIVATIONS.get(str(path).rsplit(".", 1)[-1])
    if activation is None:
        raise ConfigError(f"{name}: config.json asks for the activation {path}; tp-embed applies "
                          f"{', '.join(ST_ACTIVATIONS)}")
    return activation


def classifier_head(hf, raw: dict, name: str, token_ids: tuple[int, ...] = (),
                    tokens: tuple[str, ...] = (), pair_template: str | None = None) -> HeadConfig:
    """The HeadConfig of a classification checkpoint: labels from id2label, sigmoid for one label (unless
    sentence-transformers' config says otherwise) or a multi-label problem_type, softmax otherwise.
    With `token_ids` (classifier_from_token) the labels are the tokens, one log-odds label for two."""
    if token_ids:
        labels = tuple(tokens) if len(tokens) != 2 else (tokens[1],)
        activation = "sigmoid" if len(labels) == 1 else "softmax"
        return HeadConfig(labels, activation, tuple(token_ids), pair_template)
    num_labels = int(getattr(hf, "num_labels", 0) or 0)
    if num_labels < 1:
        raise ConfigError(f"{name}: a sequence classifier needs num_labels >= 1 in config.json")
    id2label = getattr(hf, "id2label", None) or {}
    labels = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels))
    if num_labels == 1:
        activation = st_activation(raw, name) or "sigmoid"
    elif getattr(hf, "problem_type", None) == "multi_label_classification":
        activation = "sigmoid"
    else:
        activation = "softmax"
    return HeadConfig(labels, activation, (), pair_template)


class DenseTanh(nn.Module):
    """tanh(W x + b), whole on every rank: BERT's pooler and RoBERTa's classifier.dense."""

    def __init__(self, size: int):
        super().__init__()
        self.dense = ReplicatedLinear(size, size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


def token_rows_loader(token_ids: tuple[int, ...]):
    """A weight loader that reads only these rows of an LM head (or of the tied embedding table): a
    reranker built on a causal LM needs two rows of a vocabulary-sized matrix."""

    def load(param: nn.Parameter, loaded, shard_id=None) -> None:
        vocab, hidden = loaded_shape(loaded)
        if hidden != param.shape[1] or max(token_ids) >= vocab:
            raise ValueError(f"checkpoint shape {(vocab, hidden)} does not hold rows {list(token_ids)} of width "
                             f"{param.shape[1]}")
        for row, token in enumerate(token_ids):
            param.data[row].copy_(loaded[token:token + 1][0])

    return load
