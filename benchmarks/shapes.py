"""Published models' shapes, as config directories the engine loads with `--load-format dummy` (random
weights, no download): the benchmarks time a family at its real size without its checkpoint.

    python benchmarks/bench_engine.py --shape all-mpnet-base-v2 --seq-lens 128,512

Each entry is the model's config.json as published (the fields the engine reads), with its architecture.
"""

import os

# name -> (architecture, model_type, config fields)
SHAPES = {
    "bge-base-en-v1.5": ("BertModel", "bert", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=30522,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)),
    "all-MiniLM-L6-v2": ("BertModel", "bert", dict(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12, vocab_size=30522,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)),
    "all-mpnet-base-v2": ("MPNetForMaskedLM", "mpnet", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=30527,
        max_position_embeddings=514, relative_attention_num_buckets=32, layer_norm_eps=1e-5)),
    "gte-modernbert-base": ("ModernBertModel", "modernbert", dict(
        hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12, vocab_size=50368,
        max_position_embeddings=8192, local_attention=128, global_attn_every_n_layers=3,
        global_rope_theta=160000.0, local_rope_theta=10000.0)),
    "embeddinggemma-300m": ("Gemma3TextModel", "gemma3_text", dict(
        hidden_size=768, intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=2048,
        query_pre_attn_scalar=256, sliding_window=512, use_bidirectional_attention=True, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", rope_theta=1000000.0, rope_local_base_freq=10000.0,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4)),
    "bge-multilingual-gemma2": ("Gemma2Model", "gemma2", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256002, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0)),
}


def write_tiny_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer (the benchmarks feed token ids; the engine only needs one to exist)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, min(vocab_size, 1000))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=32768).save_pretrained(path)


def write_shape(path: str, name: str, num_layers: int | None = None) -> str:
    """A config directory with `name`'s shape (num_layers, when given, replaces its layer count: a large
    model's per-layer speed on a machine that cannot hold all of it) and a tokenizer; returns path."""
    from transformers import AutoConfig

    architecture, model_type, fields = SHAPES[name]
    fields = dict(fields)
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
        if "layer_types" in fields:
            fields["layer_types"] = fields["layer_types"][:num_layers]
    os.makedirs(path, exist_ok=True)
    cfg = AutoConfig.for_model(model_type, **fields)
    cfg.architectures = [architecture]
    cfg.save_pretrained(path)
    write_tiny_tokenizer(path, fields["vocab_size"])
    return path
