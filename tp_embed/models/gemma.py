"""Gemma 2 (bge-multilingual-gemma2) and Gemma 3 text (EmbeddingGemma) decoders, as transformers runs them.

What sets them apart from the Llama-style decoder (tp_embed/models/decoder.py):
- token embeddings times sqrt(hidden_size), that factor rounded to the model's dtype first;
- RMSNorm that scales by (1 + weight), in float32 before the cast back; four norms a layer:
  x = x + post_attention_norm(attn(input_norm(x))); x = x + post_feedforward_norm(mlp(pre_feedforward_norm(x)));
- a GeGLU MLP, down(gelu_tanh(gate(x)) * up(x));
- attention scores scaled by query_pre_attn_scalar ** -0.5 rather than head_dim ** -0.5;
- `layer_types`: each layer is "sliding_attention" (keys within a window) or "full_attention".
Gemma 2 soft-caps the attention logits (attn_logit_softcapping) and is causal. Gemma 3 adds q/k RMSNorm and
a rope base per layer type (10,000 on sliding layers); transformers' Gemma3Attention never applies
attn_logit_softcapping, so neither does this. EmbeddingGemma sets `use_bidirectional_attention`: full layers
see every token and sliding ones the tokens within the window on both sides.
"""

from dataclasses import replace

import torch
from torch import nn

from tp_embed.batch import Batch
from tp_embed.config import ModelConfig
from tp_embed.errors import ConfigError
from tp_embed.layers.attention import plan_attention
from tp_embed.layers.linear import VocabParallelEmbedding
from tp_embed.layers.norm import GemmaRMSNorm
from tp_embed.layers.rotary import RotaryEmbedding, rope_inv_freq
from tp_embed.models import decoder
from tp_embed.models.decoder import PACKED_MODULES, DecoderAttention, DecoderMLP
from tp_embed.models.spec import CheckpointLayout, ModelSpec

LAYER_TYPES = ("sliding_attention", "full_attention")


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = DecoderAttention(cfg, norm=GemmaRMSNorm, o_bias=cfg.qkv_bias)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = DecoderMLP(cfg)  # GeGLU: hidden_act gelu_pytorch_tanh
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, residual, rope, attn, rows=None):
        """As the decoder's layer (decoder.DecoderLayer): (this layer's normed MLP output, the stream before it),
        each add fused with the norm after it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, attn, rows))
        h, residual = self.pre_feedforward_layernorm.add(h, residual if rows is None else residual[rows])
        return self.post_feedforward_layernorm(self.mlp(h)), residual


def sliding_window(hf) -> int | None:
    """The attention contract's window (the farthest key a sliding layer sees) from the config transformers
    built. Causal layers keep kv_idx > q_idx - sliding_window; bidirectional Gemma 3 keeps |q_idx - kv_idx| <
    sliding_window, where Gemma3TextConfig has already turned config.json's w into w // 2 + 1 (so w // 2 on
    each side). Either way, sliding_window - 1."""
    return None if hf.sliding_window is None else hf.sliding_window - 1


class GemmaModel(nn.Module):
    """Embeddings, the layers and the final norm; one attention plan and one rope table per layer type."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hf = cfg.hf_config
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size_padded, cfg.hidden_size)
        # float32 like transformers' buffer, cast to the model's dtype when used (sqrt(3072) = 55.43 is 55.5 in bf16)
        self.register_buffer("normalizer", torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.float32),
                             persistent=False)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.layer_types = tuple(hf.layer_types)
        self.scale = hf.query_pre_attn_scalar ** -0.5
        self.softcap = hf.attn_logit_softcapping if hf.model_type == "gemma2" else None
        self.windows = {t: sliding_window(hf) if t == "sliding_attention" else None for t in set(self.layer_types)}
        self.rotary = nn.ModuleDict(
            {t: RotaryEmbedding(*rope_inv_freq(hf, cfg.head_dim, t), max_positions=cfg.max_input_tokens)
             for t in sorted(self.windows)})

    def forward(self, batch: Batch, attention_backend: str = "auto", rows: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [num_tokens, hidden] of the packed batch, whole on every rank; with `rows`,
        [len(rows), hidden] for those rows only (the final layer pruned)."""
        cfg = self.cfg
        x = self.embed_tokens(batch.input_ids)
        x = x * self.normalizer.to(x.dtype)
        rope, attn = {}, {}
        for t, window in self.windows.items():
            rope[t] = self.rotary[t](batch.positions, batch.max_seqlen, x.dtype)
            attn[t] = plan_attention(batch.cu_seqlens, batch.max_seqlen, cfg.num_local_heads, cfg.num_local_kv_heads,
                                     cfg.head_dim, cfg.causal, x.dtype, attention_backend, scale=self.scale,
                                     window=window, softcap=self.softcap)
        last, residual = len(self.layers) - 1, None
        for i, (layer, t) in enumerate(zip(self.layers, self.layer_types)):
            x, residual = layer(x, residual, rope[t], attn[t], rows if i == last else None)
        return self.norm.add(x, residual)[0] if residual is not None else self.norm(x)


def build_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    """Gemma 2 or Gemma 3 text: the decoder's config (tp must split the query heads and split or replicate the
    KV heads), with Gemma's causality and Gemma 3's q/k norm."""
    unknown = sorted(set(hf.layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ConfigError(f"{name}: unsupported layer_types {unknown}; supported: {', '.join(LAYER_TYPES)}")
    gemma3 = hf.model_type == "gemma3_text"
    # Gemma 2's masks stay causal whatever use_bidirectional_attention says (transformers' Gemma2Model builds
    # causal masks only); Gemma 3 honours it
    causal = not (gemma3 and hf.use_bidirectional_attention)
    return replace(decoder.build_config(hf, raw, tp_size, name), causal=causal, qk_norm=gemma3)


# `model.` from *ForCausalLM; no embedder needs the LM head
CHECKPOINT = CheckpointLayout(strip_prefixes=("model.",), ignored_prefixes=("lm_head.",),
                              packed_modules=PACKED_MODULES)

GEMMA2_SPEC = ModelSpec(
    name="Gemma 2",
    architectures=("Gemma2Model", "Gemma2ForCausalLM"),
    build_config=build_config,
    model_class=GemmaModel,
    checkpoint=CHECKPOINT,
    default_pooling="last",  # bge-multilingual-gemma2: the appended <eos>
    flags=frozenset({"pooling"}),
    prunes_last_layer=True,
)

GEMMA3_SPEC = ModelSpec(
    name="Gemma 3 text (EmbeddingGemma)",
    architectures=("Gemma3TextModel", "Gemma3ForCausalLM"),
    build_config=build_config,
    model_class=GemmaModel,
    checkpoint=CHECKPOINT,
    default_pooling="mean",  # EmbeddingGemma
    flags=frozenset({"pooling"}),
    prunes_last_layer=True,
)
