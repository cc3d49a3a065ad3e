"""Cross-encoders, rerankers and classifiers at tp = 1, 2 and 4 (gloo, CPU, float32) against their references:
sentence-transformers' CrossEncoder (BERT, XLM-R), the Qwen3-Reranker model card's recipe with transformers,
and transformers' *ForSequenceClassification (classifiers, decoder heads): every score within 1e-5, every
probability within 1e-5.

One torchrun job per tp scores and classifies with all models (tests/score_models.py); the tests read its outputs.
"""

import json
import os

import numpy as np
import pytest

import tiny_models as tm
import tiny_rerankers as tr
from dist_utils import ROOT, score_models

TPS = (1, 2, 4)
ATOL = 1e-5
QUERIES = ("how do plants grow", "What is the capital of France?")
DOCUMENTS = tm.MIXED_TEXTS[:10] + [tm.LONG_TEXT]  # the last is longer than every model's context
PAIRS = [(q, d) for q in QUERIES[:1] for d in DOCUMENTS] + [(QUERIES[1], d) for d in DOCUMENTS[:4]]
TEXTS = tm.MIXED_TEXTS
INSTRUCTION = "Given a question, find passages that answer it"
with open(os.path.join(ROOT, "configs", "Qwen3-Reranker-0.6B.json")) as f:
    RERANKER_OVERRIDES = json.load(f)["json-model-override-args"]  # the preset's, as users pass it

CROSS_ENCODERS = ("bert_ce", "xlmr_ce")
RERANKERS = ("qwen3_reranker", "qwen3_reranker_tied")
CLASSIFIERS = ("bert_3labels", "xlmr_3labels", "multilabel", "qwen3_3labels", "mistral_2labels")
DECODER_SCORERS = ("qwen2_1label", "llama_1label")  # one label: they score and classify


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "bert_ce": tr.make_bert_cross_encoder(str(root / "bert_ce")),
        "xlmr_ce": tr.make_xlmr_cross_encoder(str(root / "xlmr_ce")),
        "bert_3labels": tr.make_bert_cross_encoder(str(root / "bert_3labels"), num_labels=3, seed=1),
        "xlmr_3labels": tr.make_xlmr_cross_encoder(str(root / "xlmr_3labels"), num_labels=3, seed=1),
        "multilabel": tr.make_multilabel_classifier(str(root / "multilabel")),
        "qwen3_reranker": tr.make_qwen3_reranker(str(root / "qwen3_reranker")),
        "qwen3_reranker_tied": tr.make_qwen3_reranker(str(root / "qwen3_reranker_tied"), seed=2,
                                                      tie_word_embeddings=True),
        "qwen3_3labels": tr.make_decoder_classifier(str(root / "qwen3_3labels"), "qwen3", 3),
        "mistral_2labels": tr.make_decoder_classifier(str(root / "mistral_2labels"), "mistral", 2),
        "qwen2_1label": tr.make_decoder_classifier(str(root / "qwen2_1label"), "qwen2", 1),
        "llama_1label": tr.make_decoder_classifier(str(root / "llama_1label"), "llama", 1),
    }


def model_specs(ck: dict) -> list[dict]:
    specs = []
    for name, path in ck.items():
        flags = ["--model-path", path]
        if name in RERANKERS:
            flags += ["--json-model-override-args", RERANKER_OVERRIDES]
        specs.append({"name": name, "flags": flags, "pairs": PAIRS, "texts": TEXTS})
    specs.append({"name": "qwen3_reranker_instruction", "pairs": PAIRS, "instruction": INSTRUCTION,
                  "flags": ["--model-path", ck["qwen3_reranker"], "--json-model-override-args", RERANKER_OVERRIDES]})
    return specs


@pytest.fixture(scope="module")
def outputs(checkpoints, tmp_path_factory):
    dirs = {}
    for tp in TPS:
        dirs[tp] = str(tmp_path_factory.mktemp(f"tp{tp}"))
        score_models(tp, dirs[tp], model_specs(checkpoints))
    return dirs


def load(outputs, tp, name, suffix):
    return np.load(os.path.join(outputs[tp], f"{name}.{suffix}.npy"))


def rank_stats(outputs, tp, name, rank=0):
    with open(os.path.join(outputs[tp], f"{name}.rank{rank}.json")) as f:
        return json.load(f)


def qwen3_reference(path, instruction=None):
    return np.concatenate([tr.qwen3_reranker_scores(path, q, [d for qq, d in PAIRS if qq == q], instruction)
                           for q in QUERIES])


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", CROSS_ENCODERS)
def test_cross_encoders_match_sentence_transformers(outputs, checkpoints, name, tp):
    np.testing.assert_allclose(load(outputs, tp, name, "scores"), tr.cross_encoder_scores(checkpoints[name], PAIRS),
                               rtol=0, atol=ATOL)
    np.testing.assert_allclose(load(outputs, tp, name, "raw"),
                               tr.cross_encoder_scores(checkpoints[name], PAIRS, activation=False), rtol=0, atol=ATOL)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", RERANKERS)
def test_qwen3_reranker_matches_the_model_card_recipe(outputs, checkpoints, name, tp):
    ours = load(outputs, tp, name, "scores")
    np.testing.assert_allclose(ours, qwen3_reference(checkpoints[name]), rtol=0, atol=ATOL)
    # the raw score is the log-odds of "yes" over "no"
    np.testing.assert_allclose(load(outputs, tp, name, "raw"), np.log(ours / (1 - ours)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tp", TPS)
def test_qwen3_reranker_instruction(outputs, checkpoints, tp):
    ours = load(outputs, tp, "qwen3_reranker_instruction", "scores")
    np.testing.assert_allclose(ours, qwen3_reference(checkpoints["qwen3_reranker"], INSTRUCTION), rtol=0, atol=ATOL)
    assert np.abs(ours - load(outputs, tp, "qwen3_reranker", "scores")).max() > 1e-3  # the instruction counts


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", CLASSIFIERS + DECODER_SCORERS + CROSS_ENCODERS)
def test_classify_matches_transformers(outputs, checkpoints, name, tp):
    np.testing.assert_allclose(load(outputs, tp, name, "probs"), tr.classifier_probs(checkpoints[name], TEXTS),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", DECODER_SCORERS)
def test_decoder_one_label_scores_match_transformers(outputs, checkpoints, name, tp):
    logits = tr.classifier_logits(checkpoints[name], PAIRS)[:, 0]
    np.testing.assert_allclose(load(outputs, tp, name, "raw"), logits, rtol=0, atol=ATOL)
    np.testing.assert_allclose(load(outputs, tp, name, "scores"), 1 / (1 + np.exp(-logits)), rtol=0, atol=ATOL)


def test_tasks_follow_the_head(outputs):
    tasks = {name: rank_stats(outputs, 1, name)["tasks"] for name in
             CROSS_ENCODERS + RERANKERS + CLASSIFIERS + DECODER_SCORERS}
    for name in CROSS_ENCODERS + DECODER_SCORERS:
        assert tasks[name] == ["score", "rerank", "classify"], name
    for name in RERANKERS:  # a prompt-template reranker reads pairs only
        assert tasks[name] == ["score", "rerank"], name
    for name in CLASSIFIERS:
        assert tasks[name] == ["classify"], name
    assert not os.path.exists(os.path.join(outputs[1], "bert_3labels.scores.npy"))


def test_pairs_over_the_context_lose_the_end_of_the_document(outputs, checkpoints):
    with open(os.path.join(outputs[1], "bert_ce.tokens.json")) as f:
        tokens = json.load(f)
    assert tokens[len(DOCUMENTS) - 1] == tm.MAX_SEQ_LENGTH  # the long document, cut to the context
    assert max(tokens[:len(DOCUMENTS) - 1]) < tm.MAX_SEQ_LENGTH
    with open(os.path.join(outputs[1], "qwen3_reranker.tokens.json")) as f:
        assert max(json.load(f)) == tr.QWEN3_RERANKER_MAX_LENGTH


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", RERANKERS)
def test_reranker_reads_two_rows_of_the_lm_head(outputs, name, tp):
    """Only the "no" and "yes" rows of lm_head (or of the tied embedding table) are read, never the matrix."""
    for rank in range(tp):
        stats = rank_stats(outputs, tp, name, rank)
        assert stats["largest_read_fraction"]["score.weight"] <= 1 / tr.QWEN3_RERANKER_VOCAB_SIZE + 1e-9
        assert stats["largest_read_fraction"]["embed_tokens.weight"] <= 1 / tp + 0.01
