"""SPLADE sparse encoders (naver/splade-*, OpenSearch's neural sparse encoders): a BERT or DistilBERT encoder and
its masked-LM head, pooled as sentence-transformers' SpladePooling pools them into one weight per vocabulary
entry, mostly zeros:

    logits[t] = E LN(act(W h[t] + c)) + b          E: the decoder, tied to the word embeddings unless the
                                                   checkpoint has its own; b: its bias
    w[v] = max over the tokens t of log(1 + relu(logits[t, v]))      ("sum" sums over t instead)

OpenSearch's activation_function "log1p_relu" applies log1p once more. The encoder is bert.py's; DistilBERT's
checkpoint names (q_lin, sa_layer_norm, ffn.lin1, ...) map onto the same modules, and it has no token types.
The transform (W, act, LN) is small and replicated. The decoder is vocab-parallel (ParallelLMHead): rank i
computes the logits of its rows of the padded vocabulary, CHUNK_TOKENS tokens at a time so that
[num_tokens, vocab] is never held, and pools them per sequence into [num_seqs, vocab/tp]; one all-gather
joins the ranks' columns and the padding columns are dropped.

BertForMaskedLM alone is bert.py's dense encoder: a SpladePooling module in modules.json makes a model SPLADE
(tp_embed/models/__init__.py's load_config).
"""

from dataclasses import replace

import torch
from torch import nn
from transformers.activations import ACT2FN

from tp_embed.batch import Batch
from tp_embed.config import ModelConfig, encoder_config, read_splade_pooling
from tp_embed.distributed import all_gather
from tp_embed.errors import ConfigError
from tp_embed.layers.linear import ParallelLMHead
from tp_embed.layers.norm import LayerNorm
from tp_embed.layers.replicated import ReplicatedLinear
from tp_embed.models import bert
from tp_embed.models.spec import CheckpointLayout, ModelSpec

CHUNK_TOKENS = 1024  # logit rows per decoder matmul: [1024, 30522] in float32 is 125 MB
DISTILBERT_NORM_EPS = 1e-12  # transformers' DistilBERT fixes every LayerNorm's eps; its config has none


class SpladeHead(nn.Module):
    """BERT's cls.predictions (transform.dense, its activation, transform.LayerNorm, decoder and bias), or
    DistilBERT's vocab_transform, activation, vocab_layer_norm and vocab_projector; then SpladePooling."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.splade, self.vocab_size = cfg.splade, cfg.vocab_size
        self.dense = ReplicatedLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.act = ACT2FN[cfg.hidden_act]
        self.norm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.decoder = ParallelLMHead(cfg.hidden_size, cfg.vocab_size_padded, bias=True)
        if cfg.hf_config.tie_word_embeddings:
            self.decoder.weight.tied_to = "embeddings.word_embeddings.weight"
        # BERT keeps the decoder's bias as cls.predictions.bias, and saves decoder.bias only when untied
        self.decoder.bias.tied_to = "head.bias"

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """hidden [num_tokens, hidden] -> float32 [num_seqs, vocab_size], the same on every rank."""
        x = self.norm(self.act(self.dense(hidden)))
        num_seqs = cu_seqlens.numel() - 1
        seq_ids = torch.repeat_interleave(torch.arange(num_seqs, device=x.device), cu_seqlens.diff().long())
        pooled = torch.zeros(num_seqs, self.decoder.output_size_per_partition, dtype=torch.float32,
                             device=x.device)  # [num_seqs, vocab/tp]
        for start in range(0, x.shape[0], CHUNK_TOKENS):
            rows = slice(start, start + CHUNK_TOKENS)
            weights = self.decoder(x[rows]).float().relu_().log1p_()  # [chunk, vocab/tp]
            if self.splade.activation == "log1p_relu":
                weights.log1p_()
            ids = seq_ids[rows]
            if self.splade.strategy == "max":  # every weight >= 0, so the zeros pooled starts from are neutral
                pooled.scatter_reduce_(0, ids.unsqueeze(1).expand_as(weights), weights, "amax")
            else:
                pooled.index_add_(0, ids, weights)
        return all_gather(pooled)[:, :self.vocab_size]  # [num_seqs, vocab_padded] -> the real vocabulary


class SpladeModel(bert.BertModel):
    """The encoder, then the vocab-parallel MLM head and SpladePooling: float32 [num_seqs, vocab_size]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head = SpladeHead(cfg)

    def forward(self, batch: Batch, attention_backend: str = "auto") -> torch.Tensor:
        return self.head(super().forward(batch, attention_backend), batch.cu_seqlens)


def build_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    """BERT's config, or DistilBERT's in BERT's terms (transformers maps dim, n_heads and n_layers; hidden_dim
    and activation are its own), with the SpladePooling of modules.json and the vocabulary as the output size."""
    splade = read_splade_pooling(model_dir)
    if splade is None:
        raise ConfigError(f"{name}: modules.json has no SpladePooling module, so it is not a SPLADE model")
    if hf.model_type == "distilbert":
        cfg = encoder_config(hf, tp_size, name, intermediate_size=hf.hidden_dim, norm_eps=DISTILBERT_NORM_EPS,
                             hidden_act=hf.activation, gated_mlp=False, qkv_bias=True, type_vocab_size=0)
    else:
        cfg = bert.build_config(hf, raw, tp_size, name)
    return replace(cfg, splade=splade, embedding_size=hf.vocab_size)


DISTILBERT_PACKED_MODULES = {
    "attention.q_lin": ("attention.qkv_proj", "q"),
    "attention.k_lin": ("attention.qkv_proj", "k"),
    "attention.v_lin": ("attention.qkv_proj", "v"),
    "attention.out_lin": ("attention.dense", None),
    "sa_layer_norm": ("attention.LayerNorm", None),
    "ffn.lin1": ("intermediate", None),
    "ffn.lin2": ("output", None),
    "output_layer_norm": ("output_norm", None),
}
HEAD_RENAMES = (
    ("cls.predictions.transform.dense.", "head.dense."), ("cls.predictions.transform.LayerNorm.", "head.norm."),
    ("cls.predictions.decoder.", "head.decoder."), ("cls.predictions.bias", "head.bias"),
    ("vocab_transform.", "head.dense."), ("vocab_layer_norm.", "head.norm."), ("vocab_projector.", "head.decoder."),
)

SPEC = ModelSpec(
    name="SPLADE (BERT / DistilBERT masked LM)",
    architectures=("BertForMaskedLM", "DistilBertForMaskedLM"),
    build_config=build_config,
    model_class=SpladeModel,
    # BERT's names and DistilBERT's do not overlap, so one layout reads both
    checkpoint=CheckpointLayout(
        strip_prefixes=("bert.", "distilbert."),
        ignored_prefixes=("embeddings.position_ids", "pooler.", "cls.seq_relationship."),
        renames=bert.ENCODER_RENAMES + (("transformer.layer.", "layers."),) + HEAD_RENAMES,
        packed_modules={**bert.ENCODER_PACKED_MODULES, **DISTILBERT_PACKED_MODULES}),
    default_pooling=None,  # SpladePooling is the model's own
    flag_notes={"pooling": "a SPLADE model pools its own vocabulary weights (max or sum over the tokens, as its "
                           "SpladePooling config.json says); leave --pooling out"},
)
