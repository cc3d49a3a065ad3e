"""Tiny RANDOM ModernBERT sentence-transformers checkpoints, built locally (conventions of tests/tiny_models.py:
float32, weights ~ N(0, 0.2), norm weights 1 +- 0.2, deterministic given `seed`, offline).

`make_modernbert(path, seed=0, ...)` writes a ModernBertModel (or, with `masked_lm`, a ModernBertForMaskedLM:
keys under `model.` plus the MLM head's `head.*` and `decoder.bias`) with 4 layers: layers 0 and 3 global
("full_attention", global_attn_every_n_layers = 3), 1 and 2 local ("sliding_attention") with local_attention 8,
so a local layer's query sees 4 keys on either side and most MIXED_TEXTS are longer than the window. hidden 64,
4 heads of 16, intermediate 96 (tp 1, 2 and 4 divide both), vocabulary MODERNBERT_VOCAB_SIZE = 511 (4 does not
divide it; the tokenizer has 505 entries). Rope thetas are ModernBERT's (global 160,000, local 10,000).

`legacy_config=True` spells config.json as gte-modernbert-base does (transformers 4.48 era):
global_attn_every_n_layers, global_rope_theta and local_rope_theta at the top level, no layer_types or
rope_parameters. `bias=True` turns on norm_bias, attention_bias and mlp_bias (no public checkpoint does; it
exercises the bias paths).

Tokenizer: the byte-level BPE of tiny_models (500 entries) followed by [UNK]=500, [CLS]=501, [SEP]=502,
[PAD]=503, [MASK]=504 (ModernBERT's order, after its BPE vocabulary), `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]`,
no token_type_ids, right padding.

Sentence-transformers files: `pooling="cls"` + Normalize as Alibaba-NLP/gte-modernbert-base has them, or
`pooling="mean"` + Normalize with the search_query / search_document prompts as nomic-ai/modernbert-embed-base.
"""

import functools
import json
import os

import tiny_models as tm

MODERNBERT_VOCAB_SIZE = 511  # 4 does not divide it
LOCAL_ATTENTION = 8
NOMIC_PROMPTS = {"query": "search_query: ", "document": "search_document: "}


@functools.lru_cache(maxsize=None)
def build_modernbert_tokenizer(model_max_length: int = tm.MAX_SEQ_LENGTH):
    """Byte-level BPE with ModernBERT's specials after the vocabulary and its `[CLS] $A [SEP]` template (built once
    per length: the checkpoints only save it)."""
    from tokenizers import processors

    tok = tm.train_byte_level_bpe(tm._training_corpus(), 500)
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok.add_special_tokens(specials)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tm._wrap(tok, model_max_length, "right", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                    pad_token="[PAD]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])


def make_modernbert(
    path: str,
    seed: int = 0,
    *,
    pooling: str = "cls",
    masked_lm: bool = False,
    legacy_config: bool = False,
    bias: bool = False,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_hidden_layers: int = 4,
    intermediate_size: int = 96,
    local_attention: int = LOCAL_ATTENTION,
    global_attn_every_n_layers: int = 3,
    vocab_size: int = MODERNBERT_VOCAB_SIZE,
    max_seq_length: int = tm.MAX_SEQ_LENGTH,
    prompts: dict | None = None,
    std: float = tm.DEFAULT_STD,
) -> str:
    """A tiny gte-modernbert-base (pooling "cls") or modernbert-embed-base (pooling "mean") directory; returns path."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertModel

    tokenizer = build_modernbert_tokenizer(max_seq_length)
    config = ModernBertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads, hidden_activation="gelu",
        max_position_embeddings=max_seq_length, norm_eps=1e-5, norm_bias=bias, attention_bias=bias, mlp_bias=bias,
        local_attention=local_attention, global_attn_every_n_layers=global_attn_every_n_layers,
        pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id, bos_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id, dtype="float32")
    model_class = ModernBertForMaskedLM if masked_lm else ModernBertModel
    tm.build_and_save(lambda: model_class(config), tokenizer, path, seed, std)
    if legacy_config:
        _legacy_config(path, global_attn_every_n_layers)
    if prompts is None and pooling == "mean":
        prompts = NOMIC_PROMPTS
    tm._write_st_files(path, hidden_size, pooling, max_seq_length, prompts, normalize=True)
    return path


def with_local_attention(src: str, dst: str, local_attention: int) -> str:
    """A copy of the model directory `src` whose config.json says `local_attention`; returns dst."""
    import shutil

    shutil.copytree(src, dst)
    cfg_file = os.path.join(dst, "config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["local_attention"] = local_attention
    tm._write_json(cfg_file, cfg)
    return dst


def _legacy_config(path: str, global_attn_every_n_layers: int) -> None:
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg["global_attn_every_n_layers"] = global_attn_every_n_layers
    cfg["global_rope_theta"] = rope["full_attention"]["rope_theta"]
    cfg["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    tm._write_json(cfg_file, dict(sorted(cfg.items())))


def layer_types(path: str) -> list[str]:
    """The layer kinds transformers reads from the directory's config.json."""
    from transformers import AutoConfig

    return list(AutoConfig.from_pretrained(path).layer_types)

