"""Config objects, each parsed once: the engine's settings (`EngineConfig`, from the flags), the model's
shape and per-rank sizes (`ModelConfig`, built by the family's spec in tp_embed/models/), and the
sentence-transformers defaults.

transformers' AutoConfig reads config.json (it normalises old and new key styles, e.g. `rope_theta` vs
`rope_parameters`); the sentence-transformers files (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`, `config_sentence_transformers.json`) give pooling, normalization, the input
length limit and the named prompts, read the way sentence-transformers reads them.
"""

import json
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import AutoConfig

from tp_embed.errors import ConfigError

POOLING_MODES = ("last", "mean", "cls")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def divide(numerator: int, denominator: int) -> int:
    assert numerator % denominator == 0, f"{denominator} does not divide {numerator}"
    return numerator // denominator


def _read_json(path: str) -> dict | list | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class SentenceTransformersConfig:
    """What sentence-transformers would do with this model directory."""
    pooling: str | None = None  # "last" | "mean" | "cls" | None when the directory does not say
    normalize: bool = False
    max_seq_length: int | None = None
    prompts: dict = field(default_factory=dict)
    default_prompt_name: str | None = None
    dense: tuple[str, ...] = ()  # the folders of the Dense modules after pooling, in order

    @staticmethod
    def read(model_dir: str) -> "SentenceTransformersConfig":
        modules = _read_json(os.path.join(model_dir, "modules.json")) or []
        pooling, normalize, dense = None, False, []
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith(".Router"):
                raise ConfigError(f"{model_dir}: modules.json routes queries and documents to different modules "
                                  f"(sentence-transformers' Router, e.g. an asymmetric sparse encoder); tp-embed "
                                  f"serves one module path per model")
            if kind.endswith(".Dense"):
                dense.append(module.get("path", ""))
            elif kind.endswith("SpladePooling"):
                continue  # the model's own head pools (read_splade_pooling)
            elif kind.endswith("Pooling"):
                pool_cfg = _read_json(os.path.join(model_dir, module.get("path", ""), "config.json")) or {}
                if pool_cfg.get("pooling_mode_lasttoken"):
                    pooling = "last"
                elif pool_cfg.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif pool_cfg.get("pooling_mode_mean_tokens"):
                    pooling = "mean"
                else:
                    modes = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v]
                    raise ConfigError(f"{model_dir}: unsupported sentence-transformers pooling {modes}; "
                                      f"supported: {', '.join(POOLING_MODES)}")
            elif kind.endswith("Normalize"):
                normalize = True
        bert_cfg = _read_json(os.path.join(model_dir, "sentence_bert_config.json")) or {}
        st_cfg = _read_json(os.path.join(model_dir, "config_sentence_transformers.json")) or {}
        return SentenceTransformersConfig(
            pooling=pooling, normalize=normalize, max_seq_length=bert_cfg.get("max_seq_length"),
            prompts=dict(st_cfg.get("prompts") or {}), default_prompt_name=st_cfg.get("default_prompt_name"),
            dense=tuple(dense))


@dataclass(frozen=True)
class SpladePoolingConfig:
    """sentence-transformers' SpladePooling (its folder's config.json): a SPLADE model's weight for vocabulary
    entry v is, over the input's tokens t, `strategy` ("max" or "sum") of log(1 + relu(logit[t, v])); with
    `activation` "log1p_relu" (OpenSearch's models) log1p is applied twice."""
    strategy: str
    activation: str


SPLADE_STRATEGIES = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")


def read_splade_pooling(model_dir: str) -> SpladePoolingConfig | None:
    """The SpladePooling module of the model directory's modules.json, or None where it has none."""
    for module in _read_json(os.path.join(model_dir, "modules.json")) or []:
        if module.get("type", "").endswith("SpladePooling"):
            cfg = _read_json(os.path.join(model_dir, module.get("path", ""), "config.json")) or {}
            splade = SpladePoolingConfig(cfg.get("pooling_strategy", "max"), cfg.get("activation_function", "relu"))
            if splade.strategy not in SPLADE_STRATEGIES or splade.activation not in SPLADE_ACTIVATIONS:
                raise ConfigError(f"{model_dir}: SpladePooling with pooling_strategy {splade.strategy!r} and "
                                  f"activation_function {splade.activation!r}; tp-embed supports pooling_strategy "
                                  f"{' or '.join(SPLADE_STRATEGIES)}, activation_function "
                                  f"{' or '.join(SPLADE_ACTIVATIONS)}")
            return splade
    return None


@dataclass(frozen=True)
class HeadConfig:
    """A model that scores or classifies rather than embeds: its forward returns one row of logits per
    input, `len(labels)` wide. `activation` turns logits into scores (one label) or probabilities.

    token_ids: the rows of the LM head that make the logits (vLLM's `classifier_from_token`: a causal LM
        used as a reranker reads only these rows); with two tokens the one logit is their difference, so
        that sigmoid(logit) = softmax([logit(t0), logit(t1)])[1] (Qwen3-Reranker's "no", "yes").
    pair_template: the prompt a (query, document) pair is rendered into (tp_embed/pairs.py), or None for a
        cross-encoder's tokenizer pair encoding ([CLS] query [SEP] document [SEP] with token types).
    """
    labels: tuple[str, ...]
    activation: str
    token_ids: tuple[int, ...] = ()
    pair_template: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ModelConfig:
    """Model shape and the sizes each tensor-parallel rank holds, computed once by the family's spec
    (`tp_embed/models/`) from the Hugging Face config."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    max_position_embeddings: int
    causal: bool
    hidden_act: str
    gated_mlp: bool  # down(act(gate(x)) * up(x)) rather than fc2(act(fc1(x)))
    # per rank
    tp_size: int
    num_local_heads: int
    num_local_kv_heads: int
    vocab_size_padded: int
    # size of the rows the model returns: hidden_size, CLIP's projection_dim, or a head's num_labels
    embedding_size: int
    hf_config: object = field(repr=False, compare=False)  # rope parameters, Matryoshka keys, towers
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    type_vocab_size: int = 0  # encoders' token-type embeddings
    position_offset: int = 0  # XLM-RoBERTa's positions start after padding_idx
    head: HeadConfig | None = None  # a cross-encoder or classifier (embedding_size is then num_labels)
    splade: SpladePoolingConfig | None = None  # a SPLADE model (embedding_size is then the vocabulary size)

    @property
    def tasks(self) -> tuple[str, ...]:
        """What the model serves: an embedder embeds, and scores and reranks by the cosine of its vectors;
        a one-label head scores, reranks and classifies (a reranker with a prompt template only scores and
        reranks: a text without its pair means nothing to it); a head of more labels classifies; a SPLADE
        model gives sparse vectors (one weight per vocabulary entry, mostly zeros), nothing else."""
        if self.splade is not None:
            return ("sparse",)
        if self.head is None:
            return ("embed", "score", "rerank")
        if self.head.num_labels > 1:
            return ("classify",)
        return ("score", "rerank") if self.head.pair_template else ("score", "rerank", "classify")

    @property
    def q_size(self) -> int:
        return self.num_local_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_local_kv_heads * self.head_dim

    @property
    def max_input_tokens(self) -> int:
        """Positions the model can embed (XLM-RoBERTa loses the ones before its padding offset)."""
        return self.max_position_embeddings - self.position_offset


def tp_error(tp_size: int, problem: str, valid: list[int]) -> ConfigError:
    """The error for a tp that does not fit the model: what does not fit, and the tp values that would."""
    return ConfigError(f"tp={tp_size} {problem}; use tp in {{{', '.join(map(str, valid))}}}")


def check_tp_divides_heads(tp_size: int, num_heads: int, name: str) -> None:
    if tp_size < 1 or num_heads % tp_size:
        raise tp_error(tp_size, f"does not divide num_attention_heads={num_heads} of {name}", divisors(num_heads))


def encoder_config(hf, tp_size: int, name: str, **fields) -> ModelConfig:
    """A bidirectional encoder with as many key/value heads as query heads (BERT, MPNet, ModernBERT): the
    fields such families read alike from their transformers config `hf`; `fields` gives the rest (norm_eps,
    hidden_act, gated_mlp, ...) and overrides any. Raises ConfigError for a tp that does not divide the heads."""
    num_heads = hf.num_attention_heads
    check_tp_divides_heads(tp_size, num_heads, name)
    shared = dict(
        hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers, num_heads=num_heads, num_kv_heads=num_heads,
        head_dim=hf.hidden_size // num_heads, vocab_size=hf.vocab_size,
        # DistilBERT's config calls it hidden_dim: read intermediate_size only where `fields` does not give it
        intermediate_size=fields.get("intermediate_size") or hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings, causal=False, tp_size=tp_size,
        num_local_heads=num_heads // tp_size, num_local_kv_heads=num_heads // tp_size,
        vocab_size_padded=pad_vocab(hf.vocab_size, tp_size), embedding_size=hf.hidden_size, hf_config=hf)
    return ModelConfig(**{**shared, **fields})


def pad_vocab(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of tp (each rank holds as many rows)."""
    return -(-vocab_size // tp_size) * tp_size


def read_hf_config(model_path: str, trust_remote_code: bool = False,
                   overrides: dict | None = None) -> tuple[object, dict]:
    """config.json through transformers' AutoConfig, and as the raw dict, both with `overrides` applied."""
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ConfigError(f"{model_path} has no config.json: is it a model directory?")
    raw = _read_json(os.path.join(model_path, "config.json"))
    try:
        hf = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # remote-code configs, unknown model_type
        raise ConfigError(f"could not read {model_path}/config.json with transformers: {e}. "
                          f"If the model ships its own config code, pass --trust-remote-code") from e
    for key, value in (overrides or {}).items():
        setattr(hf, key, value)
    return hf, {**raw, **(overrides or {})}


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings, built once from the flags (tp_embed/args.py says what each means)."""
    model_path: str | None
    tp: int
    dp: int
    dtype: str
    device: str | None
    dist_backend: str | None
    dist_timeout: float
    attention_backend: str
    cpu_matmul: str
    cpu_attention: str
    quantization: str | None
    fused_ops: str
    load_format: str
    trust_remote_code: bool
    model_overrides: dict
    pooling: str | None
    normalize: bool | None
    context_length: int | None
    prompts: dict
    allow_auto_truncate: bool
    long_inputs: str
    max_batch_tokens: int | None
    max_batch_seqs: int
    cuda_graph_max_tokens: int
    chat_template: str | None
    min_pixels: int
    max_pixels: int
    num_threads: int | None

    @staticmethod
    def from_args(args) -> "EngineConfig":
        """From parsed flags (`parse_with_config`); flags the engine does not read are left behind."""
        return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
             "float": torch.float32}
    if dtype not in table:
        raise ConfigError(f"--dtype {dtype}: choose one of auto, {', '.join(table)}")
    return table[dtype]
