"""ModernBERT encoders (Alibaba-NLP/gte-modernbert-base, nomic-ai/modernbert-embed-base), sharded like BERT.

Pre-LayerNorm blocks with rotary positions and no position table:
    x = LN(tok_embeddings(ids))
    x = x + Wo attn(rope(Wqkv LN(x)))          (layer 0 has no attention norm: the embeddings' norm serves)
    x = x + Wo(act(h_in) * h_gate)  where [h_in | h_gate] = Wi LN(x)       (GeGLU: the first half is activated)
    out = LN(x)
Attention is bidirectional. config.layer_types says each layer's kind: "full_attention" (every
global_attn_every_n_layers-th layer, from layer 0) sees the whole sequence with the global rope theta
(160,000); "sliding_attention" sees keys at most local_attention // 2 positions away on either side
(transformers masks |i - j| <= local_attention // 2) with the local rope theta (10,000). One attention plan
and one rotary table per kind serve all the layers of that kind. Norms carry a bias only with norm_bias,
Wqkv and the attention's Wo only with attention_bias, Wi and the MLP's Wo only with mlp_bias.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN

from tp_embed.batch import Batch
from tp_embed.config import ModelConfig, check_tp_divides_heads, divisors, encoder_config, tp_error
from tp_embed.errors import ConfigError
from tp_embed.layers.attention import Attention, plan_attention
from tp_embed.layers.linear import (
    RowParallelLinear,
    StackedColumnParallelLinear,
    VocabParallelEmbedding,
    bucket_rows,
    pad_rows,
)
from tp_embed.layers.rotary import Rope, RotaryEmbedding, rope_inv_freq
from tp_embed.layers.weights import replicated_weight_loader
from tp_embed.models.spec import CheckpointLayout, ModelSpec

ATTENTION_KINDS = ("full_attention", "sliding_attention")


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    """A replicated LayerNorm, with a bias only where the checkpoint has one (norm_bias)."""
    norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.hf_config.norm_bias)
    for p in norm.parameters():
        p.requires_grad_(False)
        p.weight_loader = replicated_weight_loader
    return norm


class ModernBertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size_padded, cfg.hidden_size)
        self.norm = layer_norm(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class ModernBertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.Wqkv = StackedColumnParallelLinear(cfg.hidden_size, cfg.hidden_size, 3, bias=cfg.qkv_bias)
        self.Wo = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, rope: Rope, attn: Attention,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """residual + Wo attn(x); with `rows`, for those rows only (the final layer, pruned)."""
        cfg = self.cfg
        num_rows = x.shape[0]
        # [num_rows, 3 * local_heads, head_dim]: the q heads, then the k heads, then the v heads
        q, k, v = self.Wqkv(x).view(num_rows, 3 * cfg.num_local_heads, cfg.head_dim).chunk(3, dim=1)
        q, k = rope.rotate(q, k)
        o = attn.run(q, k, v)  # [num_rows, local_heads, head_dim]
        if rows is not None:
            o, residual = o[rows], residual[rows]
        return self.Wo(o.reshape(o.shape[0], cfg.q_size), residual=residual)


class ModernBertMLP(nn.Module):
    """residual + Wo(act(h_in) * h_gate), [h_in | h_gate] = Wi x; each rank holds its shard of both halves."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.hf_config.mlp_bias
        self.Wi = StackedColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, 2, bias=bias)
        self.act = ACT2FN[cfg.hidden_act]
        self.Wo = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h_in, h_gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(h_in) * h_gate, residual=residual)


class ModernBertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.Identity() if layer_idx == 0 else layer_norm(cfg)
        self.attn = ModernBertAttention(cfg)
        self.mlp_norm = layer_norm(cfg)
        self.mlp = ModernBertMLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, attn: Attention, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn(self.attn_norm(x), x, rope, attn, rows)
        return self.mlp(self.mlp_norm(x), x)


class ModernBertModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hf = cfg.hf_config
        self.embeddings = ModernBertEmbeddings(cfg)
        self.layers = nn.ModuleList(ModernBertLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = layer_norm(cfg)
        self.layer_types = tuple(hf.layer_types)
        # the largest distance a key may be from its query, per kind
        self.window = {"full_attention": None, "sliding_attention": hf.local_attention // 2}
        self.kinds = tuple(kind for kind in ATTENTION_KINDS if kind in self.layer_types)
        # ModernBERT's rope has no attention scaling
        self.rotary = nn.ModuleDict({kind: RotaryEmbedding(rope_inv_freq(hf, cfg.head_dim, kind)[0],
                                                           max_positions=cfg.max_input_tokens)
                                     for kind in self.kinds})

    def forward(self, batch: Batch, attention_backend: str = "auto", rows: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [num_tokens, hidden] of the packed batch, whole on every rank; with `rows`,
        [len(rows), hidden] for those rows only (the final layer pruned)."""
        cfg = self.cfg
        x = self.embeddings(batch.input_ids)
        num_tokens = num_rows = x.shape[0]
        if self.layers and self.layers[0].attn.Wqkv.packed is not None:
            # oneDNN's matmuls run at bucketed row counts: pad once here (as BertModel does) rather than in
            # every linear layer; attention stops at the batch's tokens
            num_rows = bucket_rows(num_tokens)
            x = pad_rows(x, num_rows)
        plans = {}
        for kind in self.kinds:
            attn = plan_attention(batch.cu_seqlens, batch.max_seqlen, cfg.num_local_heads, cfg.num_local_heads,
                                  cfg.head_dim, False, x.dtype, attention_backend, window=self.window[kind])
            plans[kind] = (self.rotary[kind](batch.positions, batch.max_seqlen, x.dtype, num_rows), attn)
        last = len(self.layers) - 1
        for i, (layer, kind) in enumerate(zip(self.layers, self.layer_types)):
            x = layer(x, *plans[kind], rows if i == last else None)
        return self.final_norm(x if rows is not None else x[:num_tokens])


def build_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    """tp must divide the heads and the MLP's intermediate size (gte-modernbert-base: 12 heads, 1152)."""
    num_heads = hf.num_attention_heads
    check_tp_divides_heads(tp_size, num_heads, name)
    valid = [d for d in divisors(num_heads) if hf.intermediate_size % d == 0]
    if tp_size not in valid:
        raise tp_error(tp_size, f"does not divide intermediate_size={hf.intermediate_size} of {name}", valid)
    unknown = sorted(set(hf.layer_types) - set(ATTENTION_KINDS))
    if unknown:
        raise ConfigError(f"{name}: unknown layer_types {unknown}; ModernBERT has {', '.join(ATTENTION_KINDS)}")
    for kind in set(hf.layer_types):
        rope_type = hf.rope_parameters[kind].get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"{name}: rope_type {rope_type!r} for {kind} layers is not supported; ModernBERT "
                              f"layers take the default rotary embedding")
    return encoder_config(hf, tp_size, name, norm_eps=hf.norm_eps, hidden_act=hf.hidden_activation, gated_mlp=True,
                          qkv_bias=hf.attention_bias)


SPEC = ModelSpec(
    name="ModernBERT encoder",
    architectures=("ModernBertModel", "ModernBertForMaskedLM"),
    build_config=build_config,
    model_class=ModernBertModel,
    # ModernBertForMaskedLM nests the encoder under `model.`; its MLM head (head.*, decoder.*) is not used
    checkpoint=CheckpointLayout(strip_prefixes=("model.",), ignored_prefixes=("head.", "decoder.")),
    # sentence-transformers pools the mean of the tokens when a directory has no Pooling config
    default_pooling="mean",
    flags=frozenset({"pooling"}),
    prunes_last_layer=True,
)
