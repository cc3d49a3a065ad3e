"""BERT and XLM-RoBERTa encoders (the BGE family, all-MiniLM), sharded like the decoders.

Post-LayerNorm blocks: x = LN(x + attn(x)); x = LN(x + W2 act(W1 x)). Attention is bidirectional.
XLM-RoBERTa differs only in where positions start (after its padding index) and its vocabulary.
Their *ForSequenceClassification checkpoints (cross-encoders such as ms-marco-MiniLM and the bge-rerankers,
and classifiers) add a head on the first token: CLASSIFIER_SPEC.
"""

from dataclasses import replace

import torch
from torch import nn
from transformers.activations import ACT2FN

from tp_embed.batch import Batch
from tp_embed.config import ModelConfig, encoder_config
from tp_embed.layers.attention import Attention, plan_attention
from tp_embed.layers.linear import (
    FUSABLE_ACTIVATIONS,
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    bucket_rows,
    pad_rows,
)
from tp_embed.layers.norm import LayerNorm
from tp_embed.layers.replicated import ReplicatedEmbedding, ReplicatedLinear
from tp_embed.models.heads import DenseTanh, classifier_head
from tp_embed.models.spec import CheckpointLayout, ModelSpec


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.position_offset = cfg.position_offset
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size_padded, cfg.hidden_size)
        self.position_embeddings = ReplicatedEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        # DistilBERT has no token types (type_vocab_size 0)
        self.token_type_embeddings = (ReplicatedEmbedding(cfg.type_vocab_size, cfg.hidden_size)
                                      if cfg.type_vocab_size else None)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids)
        x = x + self.position_embeddings(batch.positions + self.position_offset)
        types = self.token_type_embeddings
        if types is not None and batch.token_type_ids is None:
            x = x + types.weight[0]  # single-segment inputs: every token has type 0
        elif types is not None:
            x = x + types(batch.token_type_ids)  # cross-encoders' (query, document) pairs
        return self.LayerNorm(x)


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_heads, bias=True)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, attn: Attention, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[num_tokens, hidden], or [len(rows), hidden] for only those rows (the final layer, pruned)."""
        cfg = self.cfg
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).view(num_tokens, 3 * cfg.num_local_heads, cfg.head_dim).chunk(3, dim=1)
        o = attn.run(q, k, v)  # [num_tokens, local_heads, head_dim]
        if rows is not None:
            o, x = o[rows], x[rows]
        return self.LayerNorm(self.dense(o.reshape(o.shape[0], cfg.q_size), residual=x))


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        # BERT's "gelu" is the exact (erf) GELU: the intermediate layer applies it itself (fused on oneDNN)
        fused = cfg.hidden_act if cfg.hidden_act in FUSABLE_ACTIVATIONS else None
        self.intermediate = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True,
                                                 activation=fused)
        self.act = nn.Identity() if fused else ACT2FN[cfg.hidden_act]
        self.output = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.output_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, attn: Attention, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, attn, rows)
        return self.output_norm(self.output(self.act(self.intermediate(x)), residual=x))


class BertModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, batch: Batch, attention_backend: str = "auto", rows: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [num_tokens, hidden]; with `rows`, [len(rows), hidden] (the final layer pruned)."""
        x = self.embeddings(batch)
        num_tokens = x.shape[0]
        if self.layers and self.layers[0].attention.qkv_proj.packed is not None:
            # oneDNN's matmuls run at bucketed row counts: pad once here rather than in every layer (every
            # op is row-wise but attention, which stops at the batch's tokens)
            x = pad_rows(x, bucket_rows(num_tokens))
        attn = plan_attention(batch.cu_seqlens, batch.max_seqlen, self.cfg.num_local_heads,
                              self.cfg.num_local_heads, self.cfg.head_dim, False, x.dtype, attention_backend)
        return run_layers(self.layers, x, attn, rows, num_tokens)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, attn: Attention, rows: torch.Tensor | None,
               num_tokens: int) -> torch.Tensor:
    """The encoder's layers on x (its rows may be padded past num_tokens); the last stops at `rows` if given."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        x = layer(x, attn, rows if i == last else None)
    return x if rows is not None else x[:num_tokens]


class BertClassifier(BertModel):
    """BertForSequenceClassification and XLMRobertaForSequenceClassification (cross-encoders and
    classifiers): the encoder, then on each sequence's first token tanh(dense) and a linear layer to the
    labels. BERT calls the first its pooler and the second its classifier; RoBERTa calls them
    classifier.dense and classifier.out_proj. Returns logits float32 [num_seqs, num_labels]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head_dense = DenseTanh(cfg.hidden_size)
        self.head_out = ReplicatedLinear(cfg.hidden_size, cfg.head.num_labels, bias=True)

    def forward(self, batch: Batch, attention_backend: str = "auto") -> torch.Tensor:
        hidden = super().forward(batch, attention_backend)
        first = hidden[batch.cu_seqlens[:-1].long()]
        return self.head_out(self.head_dense(first)).float()


def build_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    return encoder_config(
        hf, tp_size, name, head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act, gated_mlp=False, qkv_bias=True,
        type_vocab_size=hf.type_vocab_size,
        position_offset=hf.pad_token_id + 1 if hf.model_type == "xlm-roberta" else 0)


def build_classifier_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    head = classifier_head(hf, raw, name)
    return replace(build_config(hf, raw, tp_size, name), head=head, embedding_size=head.num_labels)


# old BERT checkpoints: encoder.layer.N, and LayerNorm's gamma and beta
ENCODER_RENAMES = (("encoder.layer.", "layers."), (".gamma", ".weight"), (".beta", ".bias"))
ENCODER_PACKED_MODULES = {
    "attention.self.query": ("attention.qkv_proj", "q"),
    "attention.self.key": ("attention.qkv_proj", "k"),
    "attention.self.value": ("attention.qkv_proj", "v"),
    "attention.output.dense": ("attention.dense", None),
    "attention.output.LayerNorm": ("attention.LayerNorm", None),
    "intermediate.dense": ("intermediate", None),
    "output.dense": ("output", None),
    "output.LayerNorm": ("output_norm", None),
}


SPEC = ModelSpec(
    name="BERT / XLM-RoBERTa encoder",
    architectures=("BertModel", "BertForMaskedLM", "XLMRobertaModel", "XLMRobertaForMaskedLM"),
    build_config=build_config,
    model_class=BertModel,
    checkpoint=CheckpointLayout(
        strip_prefixes=("bert.", "roberta.", "model."),
        ignored_prefixes=("pooler.", "cls.", "lm_head.", "embeddings.position_ids"),
        renames=ENCODER_RENAMES, packed_modules=ENCODER_PACKED_MODULES),
    default_pooling="cls",
    flags=frozenset({"pooling"}),
    prunes_last_layer=True,
)

def classifier_spec(name: str, architecture: str, head_renames: tuple, ignored: tuple = ()) -> ModelSpec:
    return ModelSpec(
        name=name,
        architectures=(architecture,),
        build_config=build_classifier_config,
        model_class=BertClassifier,
        checkpoint=CheckpointLayout(strip_prefixes=("bert.", "roberta."),
                                    ignored_prefixes=("embeddings.position_ids",) + ignored,
                                    renames=ENCODER_RENAMES + head_renames, packed_modules=ENCODER_PACKED_MODULES),
        default_pooling=None,  # the head reads the first token itself
    )


# BERT's head is its pooler and a classifier; RoBERTa's is classifier.dense and classifier.out_proj (and a
# pooler, where a checkpoint has one, is unused)
BERT_CLASSIFIER_SPEC = classifier_spec(
    "BERT cross-encoder or classifier", "BertForSequenceClassification",
    (("pooler.dense.", "head_dense.dense."), ("classifier.", "head_out.")))
XLMR_CLASSIFIER_SPEC = classifier_spec(
    "XLM-RoBERTa cross-encoder or classifier", "XLMRobertaForSequenceClassification",
    (("classifier.dense.", "head_dense.dense."), ("classifier.out_proj.", "head_out.")), ignored=("pooler.",))
