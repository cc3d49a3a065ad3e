"""One config object, parsed once: model shape, per-rank sizes, and the sentence-transformers defaults.

transformers' AutoConfig reads config.json (it normalises old and new key styles, e.g. `rope_theta` vs
`rope_parameters`); the sentence-transformers files (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`, `config_sentence_transformers.json`) give pooling, normalization, the input
length limit and the named prompts, read the way sentence-transformers reads them.
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig

from tp_embed.errors import ConfigError

# architecture name in config.json -> model family. A dict is enough (house style: no registry).
DECODER_ARCHITECTURES = (
    "MistralModel", "MistralForCausalLM", "LlamaModel", "LlamaForCausalLM",
    "Qwen2Model", "Qwen2ForCausalLM", "Qwen3Model", "Qwen3ForCausalLM",
)
ENCODER_ARCHITECTURES = (
    "BertModel", "BertForMaskedLM",
    "XLMRobertaModel", "XLMRobertaForMaskedLM",
)
FAMILIES = {**{a: "decoder" for a in DECODER_ARCHITECTURES}, **{a: "encoder" for a in ENCODER_ARCHITECTURES}}
# Qwen2-VL (GME): a vision tower whose features enter the Qwen2 decoder
FAMILIES["Qwen2VLForConditionalGeneration"] = "qwen2_vl"
# CLIP: a text and a vision tower, each with its own pooling and projection
FAMILIES["CLIPModel"] = "clip"

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

    @staticmethod
    def read(model_dir: str) -> "SentenceTransformersConfig":
        modules = _read_json(os.path.join(model_dir, "modules.json")) or []
        pooling, normalize = None, False
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
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
            prompts=dict(st_cfg.get("prompts") or {}), default_prompt_name=st_cfg.get("default_prompt_name"))


@dataclass(frozen=True)
class ModelConfig:
    """Model shape and the sizes each tensor-parallel rank holds, computed once."""
    model_path: str
    architecture: str
    family: str  # "decoder" | "encoder" | "qwen2_vl" | "clip"
    model_type: str
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
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    hidden_act: str
    # encoder only
    type_vocab_size: int
    pad_token_id: int | None
    position_offset: int  # XLM-RoBERTa's positions start after padding_idx
    # per rank
    tp_size: int
    num_local_heads: int
    num_local_kv_heads: int
    vocab_size_padded: int
    hf_config: object = field(repr=False, compare=False)  # for rope parameters

    @property
    def q_size(self) -> int:
        return self.num_local_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_local_kv_heads * self.head_dim

    @staticmethod
    def from_pretrained(model_path: str, tp_size: int = 1, trust_remote_code: bool = False,
                        overrides: dict | None = None, name: str | None = None) -> "ModelConfig":
        name = name or os.path.basename(os.path.normpath(model_path))
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
        archs = list(getattr(hf, "architectures", None) or raw.get("architectures") or [])
        arch = next((a for a in archs if a in FAMILIES), None)
        if arch is None:
            raise ConfigError(f"{name}: unsupported architecture {archs or '(none in config.json)'}; "
                              f"supported: {', '.join(FAMILIES)}")
        family = FAMILIES[arch]
        if family == "clip":
            return clip_model_config(model_path, name, arch, hf, tp_size)
        hf_config = hf
        if family == "qwen2_vl":
            # from here on `hf` is the decoder's config: AutoConfig keeps it in text_config (and moves
            # a flat, pre-v5 config.json's keys there too)
            hf = hf.get_text_config()
        num_heads = hf.num_attention_heads
        if tp_size < 1 or num_heads % tp_size != 0:
            raise ConfigError(
                f"tp={tp_size} does not divide num_attention_heads={num_heads} of {name}; "
                f"use tp in {{{', '.join(map(str, divisors(num_heads)))}}}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
        if family in ("decoder", "qwen2_vl"):
            # KV heads are split when tp divides them and replicated when tp exceeds them.
            if tp_size <= num_kv_heads and num_kv_heads % tp_size != 0 or \
                    tp_size > num_kv_heads and tp_size % num_kv_heads != 0:
                valid = [d for d in divisors(num_heads)
                         if (d <= num_kv_heads and num_kv_heads % d == 0) or (d > num_kv_heads and d % num_kv_heads == 0)]
                raise ConfigError(
                    f"tp={tp_size} does not fit num_key_value_heads={num_kv_heads} of {name}; "
                    f"use tp in {{{', '.join(map(str, valid))}}}")
            if family == "qwen2_vl" and hf_config.vision_config.num_heads % tp_size != 0:
                vision_heads = hf_config.vision_config.num_heads
                valid = [d for d in divisors(vision_heads) if num_heads % d == 0 and (
                    (d <= num_kv_heads and num_kv_heads % d == 0) or (d > num_kv_heads and d % num_kv_heads == 0))]
                raise ConfigError(
                    f"tp={tp_size} does not divide the vision tower's num_heads={vision_heads} of {name}; "
                    f"use tp in {{{', '.join(map(str, valid))}}}")
            causal = (overrides or {}).get("is_causal", raw.get("is_causal", getattr(hf, "is_causal", True)))
            if causal is None:
                causal = True
            model_type = hf_config.model_type
            qkv_bias = bool(getattr(hf, "attention_bias", False)) or model_type in ("qwen2", "qwen2_vl")
            eps = hf.rms_norm_eps
            act = hf.hidden_act
            type_vocab, position_offset = 0, 0
        else:
            causal, qkv_bias = False, True
            model_type = hf.model_type
            eps = hf.layer_norm_eps
            act = hf.hidden_act
            type_vocab = hf.type_vocab_size
            position_offset = hf.pad_token_id + 1 if model_type == "xlm-roberta" else 0
        vocab_padded = -(-hf.vocab_size // tp_size) * tp_size
        return ModelConfig(
            model_path=model_path, architecture=arch, family=family, model_type=model_type,
            hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, intermediate_size=hf.intermediate_size,
            vocab_size=hf.vocab_size, norm_eps=eps, max_position_embeddings=hf.max_position_embeddings,
            causal=bool(causal), qkv_bias=qkv_bias, qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), hidden_act=act,
            type_vocab_size=type_vocab, pad_token_id=getattr(hf, "pad_token_id", None),
            position_offset=position_offset, tp_size=tp_size,
            num_local_heads=num_heads // tp_size,
            num_local_kv_heads=(max(1, num_kv_heads // tp_size) if family in ("decoder", "qwen2_vl")
                                else num_heads // tp_size),
            vocab_size_padded=vocab_padded, hf_config=hf_config)

    @property
    def max_input_tokens(self) -> int:
        """Positions the model can embed (XLM-RoBERTa loses the ones before its padding offset)."""
        return self.max_position_embeddings - self.position_offset


def clip_model_config(model_path: str, name: str, arch: str, hf, tp_size: int) -> ModelConfig:
    """CLIPModel: tp must divide both towers' heads. The shape fields describe the text tower (what
    tokenization and packing read: vocabulary, 77 positions); hidden_size is projection_dim, the size of
    every output vector. The model reads each tower's shape from hf.text_config / hf.vision_config."""
    text, vision = hf.text_config, hf.vision_config
    text_heads, vision_heads = text.num_attention_heads, vision.num_attention_heads
    if tp_size < 1 or text_heads % tp_size or vision_heads % tp_size:
        valid = divisors(math.gcd(text_heads, vision_heads))
        raise ConfigError(f"tp={tp_size} does not divide the attention heads of {name} (text tower "
                          f"{text_heads}, vision tower {vision_heads}); use tp in {{{', '.join(map(str, valid))}}}")
    return ModelConfig(
        model_path=model_path, architecture=arch, family="clip", model_type=hf.model_type,
        hidden_size=hf.projection_dim, num_layers=text.num_hidden_layers, num_heads=text_heads,
        num_kv_heads=text_heads, head_dim=text.hidden_size // text_heads, intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size, norm_eps=text.layer_norm_eps,
        max_position_embeddings=text.max_position_embeddings, causal=True, qkv_bias=True, qk_norm=False,
        tie_word_embeddings=False, hidden_act=text.hidden_act, type_vocab_size=0,
        pad_token_id=text.pad_token_id, position_offset=0, tp_size=tp_size,
        num_local_heads=text_heads // tp_size, num_local_kv_heads=text_heads // tp_size,
        vocab_size_padded=-(-text.vocab_size // tp_size) * tp_size, hf_config=hf)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
             "float": torch.float32}
    if dtype not in table:
        raise ConfigError(f"--dtype {dtype}: choose one of auto, {', '.join(table)}")
    return table[dtype]
