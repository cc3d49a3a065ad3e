"""Tiny RANDOM Gemma 2 and Gemma 3 text checkpoints with sentence-transformers files, built locally.

`make_gemma2(path)`: bge-multilingual-gemma2 in miniature. Gemma2Model, hidden 64, 4 heads / 2 KV heads of
dim 16, 3 layers (sliding, full, sliding), sliding_window 8, query_pre_attn_scalar 24 (so the attention
scale is not head_dim ** -0.5), attn_logit_softcapping 3 (small enough that the cap changes the vectors at
these weight scales; the real model's is 50); last-token pooling and Normalize.

`make_embeddinggemma(path)`: EmbeddingGemma in miniature. Gemma3TextModel with `use_bidirectional_attention`,
hidden 64, 4 heads / 2 KV heads of dim 32, 4 layers (sliding, sliding, full, sliding), sliding_window 8 in
config.json (Gemma3TextConfig reads it as 8 // 2 + 1 = 5: keys at |i - j| < 5 for sliding layers), rope
theta 10000 on sliding layers and 1e6 on full ones, q/k RMSNorm; mean pooling, two bias-free identity Dense
layers (64 -> 256 -> 64) and Normalize, and EmbeddingGemma's named prompts. With
`use_bidirectional_attention=False` and `architecture="Gemma3ForCausalLM"` it is a gemma-3-1b-style causal
text checkpoint (`model.` keys, an untied lm_head) instead.

Tokenizers: tiny_models' byte-level BPE with Gemma's specials <pad>, <eos>, <bos> appended to the vocabulary;
every sequence is `<bos> text <eos>`, as the real tokenizers encode (bge-multilingual-gemma2 pools on the <eos>).

Weights as tiny_models draws them (std 0.2), except Gemma's norm weights: Gemma's RMSNorm scales by
(1 + weight), so its weights are drawn ~ N(0, std) and scale by 1 +- std like other families' norms.
"""

import functools
import json
import os
import shutil

import torch

import tiny_models as tm

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
EMBEDDINGGEMMA_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
SLIDING_WINDOW = 8


@functools.lru_cache(maxsize=None)
def build_gemma_tokenizer(model_max_length: int = tm.MAX_SEQ_LENGTH):
    """Byte-level BPE (tiny_models' corpus) that encodes `<bos> text <eos>`; pad <pad>. Trained once per
    process (the checkpoints only save it)."""
    from tokenizers import processors

    tok = tm.train_byte_level_bpe(tm._training_corpus(), 500)
    tok.add_special_tokens([PAD, EOS, BOS])
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1", special_tokens=[(BOS, bos_id), (EOS, eos_id)])
    return tm._wrap(tok, model_max_length, "right", bos_token=BOS, eos_token=EOS, pad_token=PAD,
                    model_input_names=["input_ids", "attention_mask"])


def _special_ids(tokenizer) -> dict:
    return dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)


def _build(model_class, config, tokenizer, path: str, seed: int, std: float) -> None:
    torch.manual_seed(seed)
    model = model_class(config).eval()
    tm._randomize(model, seed, std)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.sub_(1.0)  # (1 + w) ~ 1 +- std
    tm._save(model, tokenizer, path)


def make_gemma2(path: str, seed: int = 0, *, hidden_size: int = 64, num_attention_heads: int = 4,
                num_key_value_heads: int = 2, head_dim: int = 16, num_hidden_layers: int = 3,
                intermediate_size: int = 96, vocab_size: int = tm.DECODER_VOCAB_SIZE,
                sliding_window: int = SLIDING_WINDOW, attn_logit_softcapping: float | None = 3.0,
                query_pre_attn_scalar: int = 24, std: float = tm.DEFAULT_STD) -> str:
    """bge-multilingual-gemma2 style (see the module docstring); layers alternate sliding, full, ..."""
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_gemma_tokenizer()
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window,
        attn_logit_softcapping=attn_logit_softcapping, final_logit_softcapping=30.0, dtype="float32",
        **_special_ids(tokenizer))
    _build(Gemma2Model, config, tokenizer, path, seed, std)
    tm._write_st_files(path, hidden_size, "lasttoken", tm.MAX_SEQ_LENGTH, {})
    return path


def make_embeddinggemma(path: str, seed: int = 0, *, hidden_size: int = 64, num_attention_heads: int = 4,
                        num_key_value_heads: int = 2, head_dim: int = 32, intermediate_size: int = 96,
                        layer_types: tuple[str, ...] = ("sliding_attention", "sliding_attention", "full_attention",
                                                        "sliding_attention"),
                        vocab_size: int = tm.DECODER_VOCAB_SIZE, sliding_window: int = SLIDING_WINDOW,
                        use_bidirectional_attention: bool = True, architecture: str = "Gemma3TextModel",
                        query_pre_attn_scalar: int = 24, std: float = tm.DEFAULT_STD) -> str:
    """EmbeddingGemma style (see the module docstring). `sliding_window` is config.json's value."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextModel

    tokenizer = build_gemma_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=len(layer_types), num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, max_position_embeddings=512,
        rms_norm_eps=1e-6, layer_types=list(layer_types), query_pre_attn_scalar=query_pre_attn_scalar,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        sliding_window=sliding_window, use_bidirectional_attention=use_bidirectional_attention,
        tie_word_embeddings=False, dtype="float32", **_special_ids(tokenizer))
    model_class = {"Gemma3TextModel": Gemma3TextModel, "Gemma3ForCausalLM": Gemma3ForCausalLM}[architecture]
    _build(model_class, config, tokenizer, path, seed, std)
    assert json.load(open(os.path.join(path, "config.json")))["sliding_window"] == sliding_window
    tm._write_st_files(path, hidden_size, "mean", tm.MAX_SEQ_LENGTH, EMBEDDINGGEMMA_PROMPTS)
    add_projection(path, [4 * hidden_size, hidden_size], seed)
    return path


def add_projection(path: str, sizes: list[int], seed: int = 0) -> str:
    """EmbeddingGemma's head: bias-free identity Dense layers of these output sizes after the Pooling module,
    before Normalize (folders 2_Dense, 3_Dense, ...), saved by sentence-transformers itself."""
    from sentence_transformers.sentence_transformer.modules import Dense

    modules = json.load(open(os.path.join(path, "modules.json")))
    at = next(i for i, m in enumerate(modules) if m["type"].endswith("Pooling")) + 1
    in_features = json.load(open(os.path.join(path, modules[at - 1]["path"], "config.json")))[
        "word_embedding_dimension"]
    torch.manual_seed(seed)
    for i, out_features in enumerate(sizes):
        dense = Dense(in_features, out_features, bias=False, activation_function=torch.nn.Identity())
        with torch.no_grad():
            dense.linear.weight.normal_(0, in_features ** -0.5)
        folder = f"{at + i}_Dense"
        os.makedirs(os.path.join(path, folder), exist_ok=True)
        dense.save(os.path.join(path, folder))
        modules.insert(at + i, {"path": folder, "type": "sentence_transformers.models.Dense"})
        in_features = out_features
    for i, m in enumerate(modules):
        m["idx"], m["name"] = i, str(i)
    tm._write_json(os.path.join(path, "modules.json"), modules)
    return path


def with_config(path: str, dest: str, **changes) -> str:
    """A copy of the model directory `path` at `dest` with config.json's keys changed (for references that
    show a setting matters)."""
    shutil.copytree(path, dest, dirs_exist_ok=True)
    cfg_file = os.path.join(dest, "config.json")
    cfg = json.load(open(cfg_file))
    cfg.update(changes)
    tm._write_json(cfg_file, cfg)
    return dest
