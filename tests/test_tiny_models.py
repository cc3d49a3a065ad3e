"""Checks on the tiny random checkpoints of tests/tiny_models.py: each loads with SentenceTransformer and with
transformers' AutoModel, sentence-transformers' batched/padded output equals an unpadded one-text-at-a-time
transformers forward, and the properties the server tests rely on (EOS appended, is_causal=false honoured, key names,
sharding, determinism) hold. CPU only, no network, a few seconds."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_models as tm  # noqa: E402

ATOL = 2e-5

FACTORIES = {
    "mistral": (tm.make_mistral, {}),
    "mistral_sharded": (tm.make_mistral, {"max_shard_size": "20KB"}),
    "qwen2": (tm.make_qwen2_bidirectional, {}),
    "qwen3": (tm.make_qwen3, {}),
    "bert": (tm.make_bert, {}),
    "bert_prefix": (tm.make_bert, {"with_prefix": True}),
    "xlmr": (tm.make_xlm_roberta, {}),
    "xlmr_prefix": (tm.make_xlm_roberta, {"with_prefix": True}),
}
DECODERS = ["mistral", "mistral_sharded", "qwen2", "qwen3"]
ENCODERS = ["bert", "bert_prefix", "xlmr", "xlmr_prefix"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: fn(str(root / name), **kw) for name, (fn, kw) in FACTORIES.items()}


def _json(path, *parts):
    with open(os.path.join(path, *parts), encoding="utf-8") as f:
        return json.load(f)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------

def test_tokenizers_are_deterministic():
    for build in (tm.build_decoder_tokenizer, tm.build_bert_tokenizer, tm.build_xlmr_tokenizer):
        assert build().backend_tokenizer.to_str() == build().backend_tokenizer.to_str()


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_tokenizer_appends_eos(models, name):
    tok = _tokenizer(models[name])
    assert tok.bos_token_id is None
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id == 500
    assert tok.model_max_length == tm.MAX_SEQ_LENGTH
    for text in tm.MIXED_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
    # pairs: EOS after each segment
    ids = tok("hello", "Paris")["input_ids"]
    assert ids.count(tok.eos_token_id) == 2 and ids[-1] == tok.eos_token_id
    # the saved padding side is what sentence-transformers gets
    assert tok.padding_side == ("left" if name == "qwen3" else "right")
    batch = tok(["hello", tm.MIXED_TEXTS[11]], padding=True, return_tensors="pt")
    last_real = batch["attention_mask"].shape[1] - 1 - batch["attention_mask"].flip(1).argmax(1)
    assert (batch["input_ids"][torch.arange(2), last_real] == tok.eos_token_id).all()


def test_bert_tokenizer(models):
    tok = _tokenizer(models["bert"])
    special_ids = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    assert special_ids == [0, 1, 2, 3, 4]
    enc = tok("naïve café", "Paris")
    assert enc["input_ids"][0] == 2 and enc["input_ids"][-1] == 3 and enc["input_ids"].count(3) == 2
    assert set(enc["token_type_ids"]) == {0, 1}
    assert tok.convert_ids_to_tokens(enc["input_ids"])[1:3] == ["naive", "cafe"]  # uncased, accents stripped
    for text in tm.MIXED_TEXTS:
        assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_xlmr_tokenizer(models):
    tok = _tokenizer(models["xlmr"])
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.mask_token_id == len(tok) - 1
    ids = tok("hello", "Paris")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and ids.count(2) == 3  # <s> a </s></s> b </s>
    for text in tm.MIXED_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2 and tok.unk_token_id not in ids, text


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "bert", "xlmr"])
def test_texts_fit_max_seq_length(models, name):
    path = models[name]
    tok = _tokenizer(path)
    max_len = _json(path, "sentence_bert_config.json")["max_seq_length"]
    prompts = [""] + list(_json(path, "config_sentence_transformers.json")["prompts"].values())
    for prompt in prompts + [tm.QUERY_PROMPT]:
        for text in tm.MIXED_TEXTS:
            assert len(tok(prompt + text)["input_ids"]) <= max_len, (prompt, text)
    assert len(tok(tm.LONG_TEXT)["input_ids"]) > max_len
    assert len(tm.MIXED_TEXTS) >= 16


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint layout
# ---------------------------------------------------------------------------------------------------------------------

def test_checkpoint_keys(models):
    keys = {name: tm.safetensors_keys(path) for name, path in models.items()}
    # decoders saved as *ForCausalLM: model.* + lm_head (absent when tied)
    assert "lm_head.weight" in keys["mistral"] and "lm_head.weight" in keys["qwen2"]
    assert "lm_head.weight" not in keys["qwen3"]
    for name in DECODERS:
        assert all(k.startswith("model.") or k == "lm_head.weight" for k in keys[name])
    assert "model.layers.0.self_attn.q_proj.bias" in keys["qwen2"]
    assert "model.layers.0.self_attn.o_proj.bias" not in keys["qwen2"]
    assert not any(k.endswith("proj.bias") for k in keys["mistral"] + keys["qwen3"])
    assert "model.layers.1.self_attn.q_norm.weight" in keys["qwen3"]
    assert keys["mistral_sharded"] == keys["mistral"]
    # encoders: no prefix / prefix + ignorable heads
    assert "embeddings.word_embeddings.weight" in keys["bert"] and "pooler.dense.weight" in keys["bert"]
    assert all(k.startswith(("bert.", "cls.predictions.")) for k in keys["bert_prefix"])
    assert "bert.pooler.dense.weight" in keys["bert_prefix"]
    assert all(k.startswith(("roberta.", "lm_head.")) for k in keys["xlmr_prefix"])
    assert "roberta.embeddings.position_embeddings.weight" in keys["xlmr_prefix"]


def test_shapes_and_config(models):
    from safetensors import safe_open

    def tensor(path, key):
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            return f.get_tensor(key)

    m = _json(models["mistral"], "config.json")
    assert m["architectures"] == ["MistralForCausalLM"] and m["vocab_size"] % 4 != 0
    assert (m["num_attention_heads"], m["num_key_value_heads"], m["hidden_size"]) == (8, 4, 64)
    assert tensor(models["mistral"], "model.layers.0.self_attn.k_proj.weight").shape == (32, 64)
    q2 = _json(models["qwen2"], "config.json")
    assert q2["is_causal"] is False and q2["num_key_value_heads"] == 1 and q2["architectures"] == ["Qwen2ForCausalLM"]
    q3 = _json(models["qwen3"], "config.json")
    assert q3["tie_word_embeddings"] is True and q3["head_dim"] * q3["num_attention_heads"] != q3["hidden_size"]
    assert tensor(models["qwen3"], "model.layers.0.self_attn.q_proj.weight").shape == (4 * 32, 64)
    assert tensor(models["qwen3"], "model.layers.0.self_attn.k_norm.weight").shape == (32,)
    x = _json(models["xlmr"], "config.json")
    assert x["pad_token_id"] == 1 and x["max_position_embeddings"] == tm.MAX_SEQ_LENGTH + 2
    assert _json(models["bert_prefix"], "config.json")["architectures"] == ["BertForMaskedLM"]
    # large-std random init: norms not 1, biases not 0
    ln = tensor(models["bert"], "encoder.layer.0.output.LayerNorm.weight")
    assert 0.1 < (ln - 1).std() < 0.3
    assert tensor(models["qwen2"], "model.layers.0.self_attn.k_proj.bias").abs().mean() > 0.05
    assert 0.15 < tensor(models["mistral"], "model.layers.0.mlp.up_proj.weight").std() < 0.25
    # sentence-transformers files
    pool = _json(models["qwen3"], "1_Pooling", "config.json")
    assert pool["pooling_mode_lasttoken"] is True and pool["word_embedding_dimension"] == 64
    assert _json(models["bert"], "1_Pooling", "config.json")["pooling_mode_cls_token"] is True
    assert [m["type"].rsplit(".", 1)[1] for m in _json(models["xlmr"], "modules.json")] == [
        "Transformer", "Pooling", "Normalize"]
    assert _json(models["mistral"], "config_sentence_transformers.json")["prompts"] == {"query": tm.QUERY_PROMPT}
    assert _json(models["qwen3"], "config_sentence_transformers.json")["prompts"]["query"].endswith("\nQuery:")


def test_sharded_checkpoint(models):
    from safetensors.torch import load_file

    path = models["mistral_sharded"]
    index = _json(path, "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not os.path.exists(os.path.join(path, "model.safetensors"))
    merged = {}
    for shard in shards:
        merged.update(load_file(os.path.join(path, shard)))
    full = load_file(os.path.join(models["mistral"], "model.safetensors"))
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)


def test_factories_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = load_file(os.path.join(tm.make_qwen3(str(tmp_path / "a"), seed=3), "model.safetensors"))
    b = load_file(os.path.join(tm.make_qwen3(str(tmp_path / "b"), seed=3), "model.safetensors"))
    c = load_file(os.path.join(tm.make_qwen3(str(tmp_path / "c"), seed=4), "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_legacy_config(tmp_path, models):
    from transformers import AutoConfig

    path = tm.make_mistral(str(tmp_path / "legacy"), legacy_config=True)
    raw = _json(path, "config.json")
    assert raw["rope_theta"] == 10000.0 and "rope_parameters" not in raw and raw["torch_dtype"] == "float32"
    assert AutoConfig.from_pretrained(path).rope_parameters["rope_theta"] == 10000.0
    np.testing.assert_allclose(tm.st_encode(path, tm.MIXED_TEXTS[:4]),
                               tm.st_encode(models["mistral"], tm.MIXED_TEXTS[:4]), atol=1e-6)


def test_pooling_and_normalize_variants(tmp_path):
    for path in (tm.make_bert(str(tmp_path / "bert_mean"), pooling="mean", normalize=False),
                 tm.make_qwen2_bidirectional(str(tmp_path / "qwen2_mean"), pooling="mean", normalize=False)):
        assert [m["path"] for m in _json(path, "modules.json")] == ["", "1_Pooling"]
        assert _json(path, "1_Pooling", "config.json")["pooling_mode_mean_tokens"] is True
        np.testing.assert_allclose(tm.st_encode(path, tm.MIXED_TEXTS), tm.transformers_embeddings(path, tm.MIXED_TEXTS),
                                   atol=ATOL)
        raw = tm.st_encode(path, tm.MIXED_TEXTS[:3], normalize_embeddings=False)
        assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Loading and encoding
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FACTORIES))
def test_automodel_loads_all_weights(models, name):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(models[name], local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    unexpected = set(info["unexpected_keys"])
    if name == "bert_prefix":
        assert unexpected and all(k.startswith("cls.") for k in unexpected)
    elif name == "xlmr_prefix":
        assert unexpected and all(k.startswith("lm_head.") for k in unexpected)
    else:
        assert all(k.startswith("lm_head.") for k in unexpected)  # *ForCausalLM checkpoints into the base model
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", list(FACTORIES))
def test_st_batched_equals_unpadded_transformers(models, name):
    """SentenceTransformer pads a batch of mixed lengths (right or left); a plain transformers forward on each text
    alone, pooled on its last (EOS) / first (CLS) token, must give the same normalized embedding."""
    path = models[name]
    st = tm.st_encode(path, tm.MIXED_TEXTS)
    ref = tm.transformers_embeddings(path, tm.MIXED_TEXTS)
    assert st.dtype == np.float32 and st.shape == (len(tm.MIXED_TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(st, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(st, ref, atol=ATOL)
    # not degenerate: different texts give clearly different embeddings
    cos = st @ st.T
    assert cos[~np.eye(len(st), dtype=bool)].max() < 0.99
    # one text alone == the same text inside the batch
    np.testing.assert_allclose(tm.st_encode(path, tm.MIXED_TEXTS[11]), st[11:12], atol=ATOL)


@pytest.mark.parametrize("name", ["mistral", "qwen3", "bert"])
def test_truncation_and_matryoshka(models, name):
    path = models[name]
    np.testing.assert_allclose(tm.st_encode(path, [tm.LONG_TEXT]), tm.transformers_embeddings(path, [tm.LONG_TEXT]),
                               atol=ATOL)
    small = tm.st_encode(path, tm.MIXED_TEXTS[:3], truncate_dim=32)
    assert small.shape == (3, 32)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3"])
def test_query_prompt(models, name):
    path = models[name]
    prompt = _json(path, "config_sentence_transformers.json")["prompts"]["query"]
    st = tm.st_encode(path, tm.MIXED_TEXTS[:6], prompt_name="query")
    np.testing.assert_allclose(st, tm.transformers_embeddings(path, tm.MIXED_TEXTS[:6], prompt=prompt), atol=ATOL)
    assert np.abs(st - tm.st_encode(path, tm.MIXED_TEXTS[:6])).max() > 0.05


def test_qwen2_is_causal_false_is_honoured(models):
    """transformers 5.24 runs gte-Qwen2-style `is_causal: false` bidirectionally (see tiny_models docstring), so the
    sentence-transformers reference is bidirectional, and clearly differs from a causal run."""
    path = models["qwen2"]
    texts = tm.MIXED_TEXTS
    st = tm.st_encode(path, texts)
    bi = tm.reference_embeddings_bidirectional(path, texts)
    causal = tm.reference_embeddings_causal(path, texts)
    np.testing.assert_allclose(st, bi, atol=ATOL)
    multi_token = [i for i, t in enumerate(texts) if len(_tokenizer(path)(t)["input_ids"]) > 1]
    assert np.abs(bi - causal)[multi_token].max(axis=1).min() > 0.01
    assert np.abs(bi - causal).max() > 0.2
    # sdpa (the default) agrees with the explicit eager reference too, with and without padding
    sdpa = tm.transformers_embeddings(path, texts, attn_implementation="sdpa")
    np.testing.assert_allclose(sdpa, bi, atol=ATOL)


def test_mistral_is_causal(models):
    path = models["mistral"]
    st = tm.st_encode(path, tm.MIXED_TEXTS)
    np.testing.assert_allclose(st, tm.reference_embeddings_causal(path, tm.MIXED_TEXTS), atol=ATOL)
    assert np.abs(st - tm.reference_embeddings_bidirectional(path, tm.MIXED_TEXTS)).max() > 0.2
