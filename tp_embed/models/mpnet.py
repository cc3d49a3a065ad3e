"""MPNet encoders (sentence-transformers/all-mpnet-base-v2, MPNetModel and MPNetForMaskedLM checkpoints).

BERT's post-LayerNorm blocks (bert.BertLayer, loaded from MPNet's key names), with three differences:
- no token-type embeddings;
- positions start after the padding index 1, as RoBERTa's: token t of a sequence has position t + 2
  (transformers hard-codes padding_idx = 1 whatever config.json's pad_token_id says);
- a learned relative position bias, one table shared by every layer, added to the scaled attention
  scores: score(i, j) += relative_attention_bias[bucket(j - i), h]. The buckets are T5's bidirectional
  ones: 16 per direction, distances 0-7 exact, then logarithmic up to 128, past which all share the last.
"""

import math

import torch
from torch import nn

from tp_embed.batch import Batch
from tp_embed.config import ModelConfig, encoder_config
from tp_embed.distributed import tp_rank
from tp_embed.errors import ConfigError
from tp_embed.layers.attention import plan_attention
from tp_embed.layers.attention.mask import relative_bias_table
from tp_embed.layers.linear import VocabParallelEmbedding, bucket_rows, pad_rows
from tp_embed.layers.norm import LayerNorm
from tp_embed.layers.replicated import ReplicatedEmbedding
from tp_embed.layers.weights import read_cols
from tp_embed.models.bert import BertLayer, run_layers
from tp_embed.models.spec import CheckpointLayout, ModelSpec

PADDING_IDX = 1  # MPNetEmbeddings.padding_idx: positions start at PADDING_IDX + 1
# transformers' MPNetEncoder.compute_position_bias buckets with these, not with config.json's
# relative_attention_num_buckets (which only sizes the table)
NUM_BUCKETS = 32
MAX_DISTANCE = 128


def relative_position_bucket(offsets: torch.Tensor) -> torch.Tensor:
    """The bucket of each key-minus-query offset j - i, computed as transformers'
    MPNetEncoder.relative_position_bucket does (the same float32 log and truncation)."""
    half = NUM_BUCKETS // 2
    max_exact = half // 2
    n = -offsets
    bucket = (n < 0).long() * half  # keys after the query take the upper half
    n = n.abs()
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(MAX_DISTANCE / max_exact)
                         * (half - max_exact)).long()
    return bucket + torch.where(n < max_exact, n, large.clamp(max=half - 1))


class RelativePositionBias(nn.Module):
    """encoder.relative_attention_bias: a [num_buckets, num_heads] table. Rank r holds the columns of its
    heads [r * local_heads, (r + 1) * local_heads), the ones its q/k/v projection computes, read from the
    checkpoint as a column slice (sharded rather than replicated-then-sliced: as simple, and each rank
    reads only what it uses)."""

    def __init__(self, num_buckets: int, num_local_heads: int):
        super().__init__()
        self.tp_rank = tp_rank()
        self.weight = nn.Parameter(torch.empty(num_buckets, num_local_heads), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        heads = param.shape[1]
        param.data.copy_(read_cols(loaded, self.tp_rank * heads, heads))

    def forward(self, max_seqlen: int) -> torch.Tensor:
        """float32 [local_heads, 2 * max_seqlen - 1]: column j - i + max_seqlen - 1 is the bias of query i
        and key j, for every pair in a sequence of up to max_seqlen tokens."""
        return relative_bias_table(lambda offsets: self.weight[relative_position_bucket(offsets)], max_seqlen,
                                   self.weight.device)


class MPNetEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.position_offset = cfg.position_offset
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size_padded, cfg.hidden_size)
        self.position_embeddings = ReplicatedEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids)
        return self.LayerNorm(x + self.position_embeddings(batch.positions + self.position_offset))


class MPNetModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = MPNetEmbeddings(cfg)
        self.relative_attention_bias = RelativePositionBias(cfg.hf_config.relative_attention_num_buckets,
                                                            cfg.num_local_heads)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, batch: Batch, attention_backend: str = "auto", rows: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [num_tokens, hidden]; with `rows`, [len(rows), hidden] (the final layer pruned)."""
        x = self.embeddings(batch)
        num_tokens = x.shape[0]
        if self.layers and self.layers[0].attention.qkv_proj.packed is not None:
            x = pad_rows(x, bucket_rows(num_tokens))  # oneDNN's bucketed row counts, once (as BertModel)
        attn = plan_attention(batch.cu_seqlens, batch.max_seqlen, self.cfg.num_local_heads,
                              self.cfg.num_local_heads, self.cfg.head_dim, False, x.dtype, attention_backend,
                              rel_bias=self.relative_attention_bias(batch.max_seqlen))
        return run_layers(self.layers, x, attn, rows, num_tokens)


def build_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    if hf.relative_attention_num_buckets < NUM_BUCKETS:
        raise ConfigError(f"{name}: relative_attention_num_buckets={hf.relative_attention_num_buckets}, but "
                          f"MPNet buckets relative positions into {NUM_BUCKETS} (as transformers does)")
    return encoder_config(hf, tp_size, name, norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act, gated_mlp=False,
                          qkv_bias=True, position_offset=PADDING_IDX + 1)


SPEC = ModelSpec(
    name="MPNet encoder",
    architectures=("MPNetModel", "MPNetForMaskedLM"),
    build_config=build_config,
    model_class=MPNetModel,
    checkpoint=CheckpointLayout(
        strip_prefixes=("mpnet.",),
        ignored_prefixes=("pooler.", "lm_head.", "embeddings.position_ids"),
        renames=(("encoder.layer.", "layers."), ("encoder.relative_attention_bias.", "relative_attention_bias.")),
        packed_modules={
            "attention.attn.q": ("attention.qkv_proj", "q"),
            "attention.attn.k": ("attention.qkv_proj", "k"),
            "attention.attn.v": ("attention.qkv_proj", "v"),
            "attention.attn.o": ("attention.dense", None),
            "intermediate.dense": ("intermediate", None),
            "output.dense": ("output", None),
            "output.LayerNorm": ("output_norm", None),
        }),
    # what sentence-transformers pools an MPNet with when the directory has no Pooling module
    default_pooling="mean",
    flags=frozenset({"pooling"}),
    prunes_last_layer=True,
)
