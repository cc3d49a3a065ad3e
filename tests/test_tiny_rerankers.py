"""Checks on the tiny random cross-encoders, classifiers and Qwen3-Reranker of tests/tiny_rerankers.py and on their
reference scorers: determinism, checkpoint layout, the reranker tokenizer ("yes"/"no" single tokens, nothing
appended), token types of BERT pairs, CrossEncoder's activation, probabilities, and the Qwen3-Reranker recipe against an
independent computation (whole-string tokenization, the base Qwen3Model and the yes/no rows of the output matrix read
from the safetensors). CPU only, no network, a few seconds."""

import hashlib
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import tiny_models as tm  # noqa: E402
import tiny_rerankers as tr  # noqa: E402

ATOL = 2e-5
QUERY = "What is the capital of France?"
DOCS = tm.MIXED_TEXTS[:8]
PAIRS = [(QUERY, d) for d in DOCS]
# The Qwen3-Reranker model card's template, typed out again here so the module's constants are checked against it.
CARD_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

FACTORIES = {
    "bert": (tr.make_bert_cross_encoder, {}),
    "bert3": (tr.make_bert_cross_encoder, {"num_labels": 3}),
    "xlmr": (tr.make_xlmr_cross_encoder, {}),
    "multilabel": (tr.make_multilabel_classifier, {}),
    "qwen3": (tr.make_qwen3_reranker, {}),
    "qwen3_tied": (tr.make_qwen3_reranker, {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rerankers")
    return {name: fn(str(root / name), **kw) for name, (fn, kw) in FACTORIES.items()}


def _json(path, *parts):
    with open(os.path.join(path, *parts), encoding="utf-8") as f:
        return json.load(f)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _bytes(path, name="model.safetensors"):
    with open(os.path.join(path, name), "rb") as f:
        return f.read()


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------------------------------
# Determinism and layout
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FACTORIES))
def test_factories_deterministic(tmp_path, name):
    fn, kw = FACTORIES[name]
    a, b = fn(str(tmp_path / "a"), seed=3, **kw), fn(str(tmp_path / "b"), seed=3, **kw)
    c = fn(str(tmp_path / "c"), seed=4, **kw)
    for file in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _bytes(a, file) == _bytes(b, file), file
    assert _bytes(a) != _bytes(c)
    assert _bytes(a, "tokenizer.json") == _bytes(c, "tokenizer.json")


def test_reranker_tokenizer_deterministic_across_processes():
    here = hashlib.sha256(tr.build_qwen3_reranker_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()
    code = ("import hashlib, tiny_rerankers as tr; "
            "print(hashlib.sha256(tr.build_qwen3_reranker_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip().splitlines()[-1] == here


def test_checkpoint_keys(models):
    keys = {name: tm.safetensors_keys(p) for name, p in models.items()}
    for name in ("bert", "bert3", "multilabel"):
        assert "bert.pooler.dense.weight" in keys[name] and "classifier.weight" in keys[name]
        assert all(k.startswith("bert.") or k.startswith("classifier.") for k in keys[name])
    assert {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
            "classifier.out_proj.bias"} <= set(keys["xlmr"])
    assert all(k.startswith(("roberta.", "classifier.")) for k in keys["xlmr"])
    assert not any("pooler" in k for k in keys["xlmr"])
    assert "lm_head.weight" in keys["qwen3"]
    assert "lm_head.weight" not in keys["qwen3_tied"]
    assert set(keys["qwen3"]) - set(keys["qwen3_tied"]) == {"lm_head.weight"}


def test_shapes_and_config(models):
    from safetensors.torch import load_file

    for name, labels in (("bert", 1), ("bert3", 3), ("multilabel", 3)):
        cfg = _json(models[name], "config.json")
        assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg["type_vocab_size"] == 2
        assert len(cfg["id2label"]) == labels
        assert load_file(os.path.join(models[name], "model.safetensors"))["classifier.weight"].shape == (labels, 64)
    assert _json(models["bert3"], "config.json")["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert _json(models["bert3"], "config.json").get("problem_type") is None
    assert _json(models["multilabel"], "config.json")["problem_type"] == "multi_label_classification"

    x = _json(models["xlmr"], "config.json")
    assert x["architectures"] == ["XLMRobertaForSequenceClassification"]
    assert x["pad_token_id"] == 1 and x["type_vocab_size"] == 1
    assert x["max_position_embeddings"] == tm.MAX_SEQ_LENGTH + 2
    xs = load_file(os.path.join(models["xlmr"], "model.safetensors"))
    assert xs["classifier.out_proj.weight"].shape == (1, 64) and xs["classifier.dense.weight"].shape == (64, 64)

    for name, tied in (("qwen3", False), ("qwen3_tied", True)):
        cfg, tok = _json(models[name], "config.json"), _tokenizer(models[name])
        assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["tie_word_embeddings"] is tied
        assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
            64, 4, 2, 16)
        assert cfg["vocab_size"] % 4 != 0 and len(tok) < cfg["vocab_size"] < len(tok) + 64
        assert tok.model_max_length == 512 and cfg["max_position_embeddings"] >= tok.model_max_length
        assert cfg["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
        st = load_file(os.path.join(models[name], "model.safetensors"))
        assert all(v.dtype == torch.float32 for v in st.values())
        assert st["model.embed_tokens.weight"].shape == (cfg["vocab_size"], 64)
        assert float(st["model.embed_tokens.weight"].std()) > 0.1  # the large-std convention


def test_tied_reranker_loads_without_missing_weights(models):
    from transformers import AutoModelForCausalLM

    for name in ("qwen3", "qwen3_tied"):
        model, info = AutoModelForCausalLM.from_pretrained(models[name], local_files_only=True,
                                                           output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert tied is (name == "qwen3_tied")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------

def test_yes_no_are_single_distinct_tokens(models):
    tok = _tokenizer(models["qwen3"])
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    assert isinstance(yes, int) and isinstance(no, int) and yes != no
    assert tok.unk_token_id is None or tok.unk_token_id not in (yes, no)
    assert tok.get_vocab()["yes"] == yes and tok.get_vocab()["no"] == no
    assert tok.convert_ids_to_tokens([yes, no]) == ["yes", "no"]
    assert yes not in tok.all_special_ids and no not in tok.all_special_ids
    assert tok.encode("yes", add_special_tokens=False) == [yes]
    assert tok.encode("no", add_special_tokens=False) == [no]
    assert 0 <= min(yes, no) and max(yes, no) < len(tok)
    # the plain embedding-style decoder tokenizer has neither: the reranker one really is a variant
    plain = tm.build_decoder_tokenizer()
    assert plain.convert_tokens_to_ids("yes") is None and plain.convert_tokens_to_ids("no") is None


def test_reranker_tokenizer_specials_and_no_appended_tokens(models):
    tok = _tokenizer(models["qwen3"])
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert t in tok.all_special_tokens and tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
    for t in ("<think>", "</think>"):  # single added tokens, not special (as in Qwen3)
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
        assert t not in tok.all_special_tokens
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    for text in ("hello", QUERY, tr.format_qwen3_reranker_pair(QUERY, DOCS[3])):
        assert tok(text)["input_ids"] == tok.encode(text, add_special_tokens=False)
    # ...unlike the embedding-style tokenizer, which appends <|endoftext|>
    plain = tm.build_decoder_tokenizer()
    assert plain("hello")["input_ids"][-1] == plain.eos_token_id
    suffix = tok.convert_ids_to_tokens(tok.encode(tr.QWEN3_RERANKER_SUFFIX, add_special_tokens=False))
    assert suffix[0] == "<|im_end|>" and "<think>" in suffix and "</think>" in suffix


def test_bert_pair_token_type_ids(models):
    for name in ("bert", "bert3", "multilabel"):
        tok = _tokenizer(models[name])
        a, b = tok.encode(QUERY, add_special_tokens=False), tok.encode(DOCS[6], add_special_tokens=False)
        enc = tok(QUERY, DOCS[6])
        assert enc["input_ids"] == [2] + a + [3] + b + [3]
        assert enc["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    x = _tokenizer(models["xlmr"])(QUERY, DOCS[6])
    assert "token_type_ids" not in x and x["input_ids"][0] == 0 and x["input_ids"].count(2) == 3


def test_reranker_prompts_fit(models):
    tok = _tokenizer(models["qwen3"])
    prefix = tok.encode(tr.QWEN3_RERANKER_PREFIX, add_special_tokens=False)
    suffix = tok.encode(tr.QWEN3_RERANKER_SUFFIX, add_special_tokens=False)
    doc200 = tok.decode(tok.encode(tm.LONG_TEXT, add_special_tokens=False)[:200])
    ids = tr.qwen3_reranker_input_ids(tok, QUERY, tm.MIXED_TEXTS + [doc200])
    assert all(len(i) < tok.model_max_length for i in ids)  # nothing truncated
    assert len(ids[-1]) > 200 + len(prefix) + len(suffix)
    long_ids = tr.qwen3_reranker_input_ids(tok, QUERY, [tm.LONG_TEXT, tm.LONG_TEXT], max_length=None)
    short_ids = tr.qwen3_reranker_input_ids(tok, QUERY, [tm.LONG_TEXT], max_length=200)
    for seq, n in ((long_ids[0], tok.model_max_length), (short_ids[0], 200)):
        assert len(seq) == n and seq[:len(prefix)] == prefix and seq[-len(suffix):] == suffix


# ---------------------------------------------------------------------------------------------------------------------
# Reference scorers
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "xlmr"])
def test_cross_encoder_default_activation_is_sigmoid(models, name):
    scores = tr.cross_encoder_scores(models[name], PAIRS)
    raw = tr.cross_encoder_scores(models[name], PAIRS, activation=False)
    assert scores.shape == raw.shape == (len(PAIRS),) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, _sigmoid(raw), atol=1e-6)
    assert np.ptp(raw) > 0.1 and np.ptp(scores) > 0.01  # differs between documents
    assert not np.allclose(scores, raw)
    # CrossEncoder's padded batch == transformers one unpadded pair at a time
    unpadded = tr.classifier_logits(models[name], PAIRS)
    assert unpadded.shape == (len(PAIRS), 1)
    np.testing.assert_allclose(raw, unpadded[:, 0], atol=ATOL)
    np.testing.assert_allclose(tr.classifier_pair_probs(models[name], PAIRS)[:, 0], scores, atol=ATOL)
    # the pair order matters (token types / segment layout): swapping query and document changes the scores
    swapped = tr.cross_encoder_scores(models[name], [(d, q) for q, d in PAIRS], activation=False)
    assert np.abs(swapped - raw).max() > 1e-3


def test_three_label_classifier(models):
    path = models["bert3"]
    logits = tr.classifier_logits(path, DOCS)
    probs = tr.classifier_probs(path, DOCS)
    assert probs.shape == (len(DOCS), 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), atol=1e-6)
    assert np.ptp(logits, axis=0).max() > 0.05
    # CrossEncoder with several labels: identity by default, [n, 3]
    ce = tr.cross_encoder_scores(path, PAIRS)
    assert ce.shape == (len(PAIRS), 3)
    np.testing.assert_allclose(ce, tr.classifier_logits(path, PAIRS), atol=ATOL)
    pair_probs = tr.classifier_pair_probs(path, PAIRS)
    np.testing.assert_allclose(pair_probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(tr.cross_encoder_scores(path, PAIRS, apply_softmax=True), pair_probs, atol=ATOL)


def test_multilabel_classifier_uses_sigmoid(models):
    path = models["multilabel"]
    logits = tr.classifier_logits(path, DOCS)
    probs = tr.classifier_probs(path, DOCS)
    assert probs.shape == (len(DOCS), 3)
    np.testing.assert_allclose(probs, _sigmoid(logits), atol=1e-6)
    assert np.abs(probs.sum(1) - 1.0).max() > 0.05  # not a softmax
    assert ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied"])
def test_qwen3_reranker_scores_match_independent_computation(models, name):
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = models[name]
    tok = _tokenizer(path)
    vocab = tok.get_vocab()
    state = load_file(os.path.join(path, "model.safetensors"))
    out_matrix = state["lm_head.weight"] if "lm_head.weight" in state else state["model.embed_tokens.weight"]
    direction = out_matrix[vocab["yes"]] - out_matrix[vocab["no"]]
    base = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa")
    base.eval()
    assert (tr.QWEN3_RERANKER_PREFIX, tr.QWEN3_RERANKER_SUFFIX) == (CARD_PREFIX, CARD_SUFFIX)
    assert tr.QWEN3_RERANKER_DEFAULT_INSTRUCTION == (
        "Given a web search query, retrieve relevant passages that answer the query")
    for instruction in (None, "Find documents about cities"):
        scores = tr.qwen3_reranker_scores(path, QUERY, DOCS, instruction=instruction)
        recipe_ids = tr.qwen3_reranker_input_ids(tok, QUERY, DOCS, instruction=instruction)
        expected = []
        for doc, ids in zip(DOCS, recipe_ids):
            inst = instruction or "Given a web search query, retrieve relevant passages that answer the query"
            text = CARD_PREFIX + f"<Instruct>: {inst}\n<Query>: {QUERY}\n<Document>: {doc}" + CARD_SUFFIX
            whole = tok.encode(text, add_special_tokens=False)
            assert whole == ids  # piecewise recipe tokenization == tokenizing the whole prompt at once
            with torch.no_grad():
                h = base(input_ids=torch.tensor([whole])).last_hidden_state[0, -1]
            expected.append(float(_sigmoid(float(direction @ h))))
        assert scores.shape == (len(DOCS),) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, expected, atol=ATOL)
        assert np.ptp(scores) > 0.01  # differs between documents
        if instruction is None:
            default_scores = scores
    assert np.abs(default_scores - scores).max() > 1e-3  # the instruction matters


def test_qwen3_reranker_truncates_long_documents(models):
    path = models["qwen3"]
    scores = tr.qwen3_reranker_scores(path, QUERY, [tm.LONG_TEXT, DOCS[0]])
    assert scores.shape == (2,) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    short = tr.qwen3_reranker_scores(path, QUERY, [tm.LONG_TEXT], max_length=200)
    assert abs(float(short[0]) - float(scores[0])) > 1e-4
