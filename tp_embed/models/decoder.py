"""One decoder for Llama/Mistral, Qwen2 and Qwen3 embedding models; their differences are config:
qkv bias (Qwen2), q/k RMSNorm and a free head_dim (Qwen3), causal or bidirectional attention
(gte-Qwen2 sets `is_causal: false`). No lm_head is built: embedders read the last hidden state, and
rerankers (CLASSIFIER_SPEC) read the rows of it they need."""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from tp_embed.batch import Batch
from tp_embed.config import ModelConfig, check_tp_divides_heads, divisors, pad_vocab, tp_error
from tp_embed.errors import ConfigError
from tp_embed.layers.attention import Attention, plan_attention
from tp_embed.layers.fused import gated_activation
from tp_embed.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from tp_embed.layers.norm import RMSNorm
from tp_embed.layers.replicated import ReplicatedLinear
from tp_embed.layers.rotary import Rope, RotaryEmbedding, mrope_section, rope_inv_freq
from tp_embed.models.heads import classifier_head, token_rows_loader
from tp_embed.models.spec import CheckpointLayout, ModelSpec


class DecoderAttention(nn.Module):
    """o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v)); `norm` is the q/k norm's class (Qwen3's RMSNorm,
    Gemma 3's GemmaRMSNorm), o_bias whether o_proj has a bias (Gemma's attention_bias)."""

    def __init__(self, cfg: ModelConfig, norm: type[RMSNorm] = RMSNorm, o_bias: bool = False):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=o_bias)
        if cfg.qk_norm:
            self.q_norm = norm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = norm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, attn: Attention, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[num_tokens, hidden], or [len(rows), hidden] for only those rows (the final layer, pruned)."""
        cfg = self.cfg
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(num_tokens, cfg.num_local_heads, cfg.head_dim)  # [num_tokens, local_heads, head_dim]
        k = k.view(num_tokens, cfg.num_local_kv_heads, cfg.head_dim)
        v = v.view(num_tokens, cfg.num_local_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.rotate(q, k)
        o = attn.run(q, k, v)  # [num_tokens, local_heads, head_dim]
        if rows is not None:
            o = o[rows]
        return self.o_proj(o.reshape(o.shape[0], cfg.q_size))


GATED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SwiGLU (Llama, Qwen), GeGLU (Gemma)


class DecoderMLP(nn.Module):
    """down(act(gate(x)) * up(x)), act silu or tanh GELU; gate and up are one column-parallel matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act not in GATED_ACTIVATIONS:
            raise ValueError(f"decoder MLP supports hidden_act {GATED_ACTIVATIONS}, not {cfg.hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False)
        self.act = cfg.hidden_act
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.gate_up_proj(x), self.act))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = DecoderAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = DecoderMLP(cfg)

    def forward(self, x, residual, rope, attn, rows=None):
        """x: the previous layer's MLP output (the embeddings for the first layer, residual None); residual: the
        stream before it. Returns (this layer's MLP output, the stream before it): each add is fused with the
        norm after it (layers/fused.py), the last one with the model's final norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add(x, residual)
        h = self.self_attn(h, rope, attn, rows)
        h, residual = self.post_attention_layernorm.add(h, residual if rows is None else residual[rows])
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size_padded, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        # Qwen2-VL nests the decoder's rope parameters in text_config; text-only configs are their own
        text_config = cfg.hf_config.get_text_config()
        inv_freq, scale = rope_inv_freq(text_config, cfg.head_dim)
        self.rotary = RotaryEmbedding(inv_freq, scale, mrope_section(text_config), cfg.max_input_tokens)

    def forward(self, batch: Batch, attention_backend: str = "auto",
                inputs_embeds: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [num_tokens, hidden] of the packed batch, whole on every rank; with `rows`,
        [len(rows), hidden] for those rows only (the final layer pruned).

        `inputs_embeds` [num_tokens, hidden], when given, replaces the token embeddings (Qwen2-VL
        scatters image features into them) and is consumed: the fused residual adds may write into it on CUDA.
        Positions may be [3, num_tokens] for M-RoPE.
        """
        x = self.embed_tokens(batch.input_ids) if inputs_embeds is None else inputs_embeds
        rope = self.rotary(batch.positions, batch.max_seqlen, x.dtype)
        attn = plan_attention(batch.cu_seqlens, batch.max_seqlen, self.cfg.num_local_heads,
                              self.cfg.num_local_kv_heads, self.cfg.head_dim, self.cfg.causal, x.dtype,
                              attention_backend)
        last, residual = len(self.layers) - 1, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, attn, rows if i == last else None)
        return self.norm.add(x, residual)[0] if residual is not None else self.norm(x)


class DecoderClassifier(DecoderModel):
    """A decoder that scores: *ForSequenceClassification (its `score` matrix on the last token), or a causal
    LM read as a reranker (vLLM's `classifier_from_token`: only the LM head's rows of those tokens are
    loaded, e.g. Qwen3-Reranker's "no" and "yes"). Returns logits float32 [num_seqs, num_labels]; with two
    tokens, the one logit logit(t1) - logit(t0), whose sigmoid is their two-way softmax.

    Which token: a reranker's last (the end of its prompt); a *ForSequenceClassification's last that is not
    the pad token, as transformers picks it (a tokenizer that appends its pad token as EOS pools before it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        head = cfg.head
        self.score = ReplicatedLinear(cfg.hidden_size, len(head.token_ids) or head.num_labels)
        self.pad_token_id = None
        if head.token_ids:
            self.score.weight.weight_loader = token_rows_loader(head.token_ids)
            if getattr(cfg.hf_config, "tie_word_embeddings", False):
                self.score.weight.tied_to = "embed_tokens.weight"  # the LM head is the embedding table
        else:
            self.pad_token_id = getattr(cfg.hf_config, "pad_token_id", None)

    def pooled_rows(self, batch: Batch) -> torch.Tensor:
        """Each sequence's row: its last token, or its last that is not the pad token (its first if all are)."""
        cu = batch.cu_seqlens.long()
        if self.pad_token_id is None:
            return cu[1:] - 1
        lengths = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
        index = torch.arange(batch.num_tokens, device=cu.device)
        keep = torch.where(batch.input_ids.long() != self.pad_token_id, index, cu[:-1][seq])
        return cu[:-1].clone().scatter_reduce_(0, seq, keep, "amax")

    def forward(self, batch: Batch, attention_backend: str = "auto") -> torch.Tensor:
        hidden = super().forward(batch, attention_backend)
        last = hidden[self.pooled_rows(batch)].float()
        logits = F.linear(last, self.score.weight.float())
        if len(self.cfg.head.token_ids) == 2:
            logits = logits[:, 1:] - logits[:, :1]
        return logits


# checkpoint name -> (parameter name, shard id) for the fused projections
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# model types whose q/k/v projections carry a bias without saying so in `attention_bias`, and those with
# q/k RMSNorm
QKV_BIAS_MODEL_TYPES = ("qwen2", "qwen2_vl")
QK_NORM_MODEL_TYPES = ("qwen3",)


def kv_head_tp_values(num_heads: int, num_kv_heads: int) -> list[int]:
    """The tp values that split the query heads and either split the KV heads or replicate each over
    tp / num_kv_heads ranks."""
    return [d for d in divisors(num_heads)
            if (d <= num_kv_heads and num_kv_heads % d == 0) or (d > num_kv_heads and d % num_kv_heads == 0)]


def build_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "", hf_config=None) -> ModelConfig:
    """The decoder's ModelConfig from its transformers config `hf`; `hf_config` is the whole model's
    config where the decoder is part of a larger one (Qwen2-VL's text_config), else `hf` itself."""
    hf_config = hf if hf_config is None else hf_config
    num_heads = hf.num_attention_heads
    check_tp_divides_heads(tp_size, num_heads, name)
    num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
    valid = kv_head_tp_values(num_heads, num_kv_heads)
    if tp_size not in valid:
        raise tp_error(tp_size, f"does not fit num_key_value_heads={num_kv_heads} of {name}", valid)
    causal = raw.get("is_causal", getattr(hf, "is_causal", True))  # gte-Qwen2 says false
    model_type = hf_config.model_type
    return ModelConfig(
        hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
        intermediate_size=hf.intermediate_size, vocab_size=hf.vocab_size, norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings, causal=True if causal is None else bool(causal),
        hidden_act=getattr(hf, "hidden_act", None) or hf.hidden_activation,  # Gemma names it hidden_activation
        gated_mlp=True, tp_size=tp_size, num_local_heads=num_heads // tp_size,
        num_local_kv_heads=max(1, num_kv_heads // tp_size), vocab_size_padded=pad_vocab(hf.vocab_size, tp_size),
        embedding_size=hf.hidden_size, hf_config=hf_config,
        qkv_bias=bool(getattr(hf, "attention_bias", False)) or model_type in QKV_BIAS_MODEL_TYPES,
        qk_norm=model_type in QK_NORM_MODEL_TYPES)


def token_ids(model_dir: str, tokens: tuple[str, ...], name: str) -> tuple[int, ...]:
    """The vocabulary ids of `tokens` by the model's own tokenizer (each must be one token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ConfigError(f"{name}: classifier_from_token names {token!r}, which is not one token of its "
                              f"tokenizer")
        ids.append(token_id)
    return tuple(ids)


def build_classifier_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    """A decoder with a head: `classifier_from_token` (a causal LM checkpoint) or a `score` matrix of
    num_labels rows; `is_original_qwen3_reranker` renders pairs into Qwen3-Reranker's prompt."""
    tokens = tuple(raw.get("classifier_from_token") or ())
    template = "qwen3-reranker" if raw.get("is_original_qwen3_reranker") else None
    if template and len(tokens) != 2:
        raise ConfigError(f"{name}: is_original_qwen3_reranker needs classifier_from_token [\"no\", \"yes\"]")
    ids = token_ids(model_dir, tokens, name) if tokens else ()
    head = classifier_head(hf, raw, name, ids, tokens, template)
    return replace(build_config(hf, raw, tp_size, name), head=head, embedding_size=head.num_labels)


SPEC = ModelSpec(
    name="decoder (Llama, Mistral, Qwen2, Qwen3)",
    architectures=("MistralModel", "MistralForCausalLM", "LlamaModel", "LlamaForCausalLM",
                   "Qwen2Model", "Qwen2ForCausalLM", "Qwen3Model", "Qwen3ForCausalLM"),
    build_config=build_config,
    model_class=DecoderModel,
    # `model.` from *ForCausalLM; no embedder needs the LM head
    checkpoint=CheckpointLayout(strip_prefixes=("model.",), ignored_prefixes=("lm_head.",),
                                packed_modules=PACKED_MODULES),
    default_pooling="last",
    flags=frozenset({"pooling"}),
    prunes_last_layer=True,
)

CLASSIFIER_SPEC = ModelSpec(
    name="decoder reranker or classifier (Qwen3-Reranker, *ForSequenceClassification)",
    architectures=("Qwen3ForSequenceClassification", "Qwen2ForSequenceClassification",
                   "LlamaForSequenceClassification", "MistralForSequenceClassification"),
    build_config=build_classifier_config,
    model_class=DecoderClassifier,
    # a causal LM read as a classifier keeps the rows it needs of lm_head as `score`
    checkpoint=CheckpointLayout(strip_prefixes=("model.",), renames=(("lm_head.", "score."),),
                                packed_modules=PACKED_MODULES),
    default_pooling=None,  # the head reads the last token itself
)
