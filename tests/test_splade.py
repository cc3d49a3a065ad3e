"""SPLADE sparse encoders at tp = 1, 2 and 4 (gloo, CPU, float32) against sentence-transformers' SparseEncoder on
tiny random checkpoints (tests/tiny_splade.py): the same nonzero vocabulary entries, and every weight within 1e-5
(plus 1e-5 of its size: a "sum" weight reaches the hundreds).

Three checkpoints, embedded in the shared job per tp (tests/family_jobs.py), the texts with LONG_TEXT cut to 256
tokens: `splade_bert` (BertForMaskedLM, tied decoder, max pooling, vocabulary 450: tp 4 pads it), `splade_bert_untied`
(its own decoder weight and bias, sum pooling) and `splade_distilbert` (DistilBertForMaskedLM: no token types,
OpenSearch's log1p_relu, vocabulary 501: tp 2 and 4 pad it). The rest run in this process at tp 1."""

import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch

import tiny_models as tm
import tiny_splade as tsp
from dist_utils import load_output as load
from family_jobs import SPLADE_TEXTS, TPS
from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import ConfigError, EngineConfig, SentenceTransformersConfig, read_splade_pooling
from tp_embed.engine import Engine
from tp_embed.models import ARCHITECTURES, SPARSE_ARCHITECTURES, bert, load_config, splade

TEXTS = SPLADE_TEXTS
NAMES = ("splade_bert", "splade_bert_untied", "splade_distilbert")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def checkpoints(family_jobs):
    return {name: family_jobs.checkpoints[name] for name in NAMES}


@pytest.fixture(scope="module")
def outputs(family_jobs):
    """{tp: output directory} of the shared job per tp (tests/family_jobs.py)."""
    return family_jobs.dirs


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: tsp.sparse_encode(path, TEXTS) for name, path in checkpoints.items()}


def assert_same_sparse_vectors(ours: np.ndarray, reference: np.ndarray, label: str) -> None:
    assert ours.shape == reference.shape, f"{label}: shape {ours.shape} != {reference.shape}"
    differ = np.argwhere((ours != 0) != (reference != 0))
    assert not len(differ), f"{label}: {len(differ)} (text, entry) zero in one and not the other, first {differ[0]}"
    np.testing.assert_allclose(ours, reference, rtol=TOLERANCE, atol=TOLERANCE, err_msg=label)


def test_references_are_sparse(references):
    """Most of each vector is exactly zero and no vector is all zeros: what the comparisons compare is real."""
    for name, ref in references.items():
        nonzero = (ref != 0).mean(axis=1)
        assert nonzero.min() > 0.01 and nonzero.max() < 0.4, f"{name}: nonzero fractions {nonzero.min(), nonzero.max()}"
        assert (ref >= 0).all()


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_sparse_encoder(outputs, references, name, tp):
    assert_same_sparse_vectors(load(outputs, tp, name), references[name], f"{name} tp={tp}")


@pytest.mark.parametrize("tp", TPS)
def test_alone_equals_in_batch(outputs, tp):
    """Each text in a batch of its own gives the vector it gets in a mixed batch."""
    assert_same_sparse_vectors(load(outputs, tp, "splade_bert", "alone.npy"), load(outputs, tp, "splade_bert"),
                               f"alone tp={tp}")


def test_long_text_is_truncated(outputs):
    lengths = json.load(open(os.path.join(outputs[1], "splade_bert.tokens.json")))
    assert lengths[-1] == tm.MAX_SEQ_LENGTH and max(lengths[:-1]) < lengths[-1]


@pytest.mark.parametrize("name, vocab", [("splade_bert", 450), ("splade_distilbert", 501)])
def test_vocab_padding_at_tp4(outputs, references, name, vocab):
    """The vocabulary (not a multiple of 4) is padded to one; the padding columns are dropped, the real last
    columns (the last rank's) hold their weights, and each rank reads only its rows of the decoder."""
    assert vocab % 4 and references[name].shape[1] == vocab
    ours = load(outputs, 4, name)
    rows_per_rank = -(-vocab // 4)
    last_rank = slice(3 * rows_per_rank, vocab)
    assert (ours[:, last_rank] != 0).any()
    np.testing.assert_allclose(ours[:, last_rank], references[name][:, last_rank], rtol=TOLERANCE, atol=TOLERANCE)
    for rank in range(4):
        stats = json.load(open(os.path.join(outputs[4], f"{name}.rank{rank}.json")))
        real_rows = min(rows_per_rank, vocab - rank * rows_per_rank)
        assert stats["largest_read_fraction"]["head.decoder.weight"] == pytest.approx(real_rows / vocab)


def test_tied_and_untied_decoders(checkpoints, references):
    """The tied checkpoint saves no decoder (transformers reads the word embeddings and cls.predictions.bias);
    the untied one saves its own weight and bias, and the embeddings with cls.predictions.bias in their place
    give other vectors: a loader that tied it anyway would fail test_matches_sparse_encoder."""
    tied = tm.safetensors_keys(checkpoints["splade_bert"])
    untied = tm.safetensors_keys(checkpoints["splade_bert_untied"])
    assert "cls.predictions.decoder.weight" not in tied and "cls.predictions.decoder.bias" not in tied
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} <= set(untied)
    wrongly_tied = str(checkpoints["splade_bert_untied"]) + ".wrongly_tied"
    shutil.copytree(checkpoints["splade_bert_untied"], wrongly_tied)
    from safetensors.torch import load_file, save_file

    file = os.path.join(wrongly_tied, "model.safetensors")
    state = load_file(file)
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    save_file(state, file, metadata={"format": "pt"})
    other = tsp.sparse_encode(wrongly_tied, TEXTS)
    assert ((other != 0) != (references["splade_bert_untied"] != 0)).mean() > 0.05


def make_engine(*flags) -> Engine:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return Engine(EngineConfig.from_args(parse_with_config(p, list(flags))), show_progress=False)


def test_engine_returns_the_sparse_encoders_rows(checkpoints, references, monkeypatch):
    """tp 1 in this process: the engine's settings for a sparse model, and the logits computed a few tokens at
    a time (chunks that end inside sequences and span several) give the same vectors."""
    engine = make_engine("--model-path", checkpoints["splade_bert"])
    assert engine.tasks == ("sparse",) and engine.config.tasks == ("sparse",)
    assert engine.pooling is None and engine.dense is None and engine.normalize is False
    assert engine.embedding_size == engine.config.embedding_size == 450
    seqs = engine.text.encode(TEXTS, truncate=True)
    whole = engine.embed(seqs)
    assert whole.dtype == torch.float32 and whole.shape == (len(TEXTS), 450)
    monkeypatch.setattr(splade, "CHUNK_TOKENS", 7)
    chunked = engine.embed(seqs).numpy()
    assert_same_sparse_vectors(chunked, references["splade_bert"], "chunks of 7 tokens")
    assert_same_sparse_vectors(engine.forward_pooled(seqs[:3]).numpy(), references["splade_bert"][:3], "forward_pooled")


def test_pooling_flag_is_refused(checkpoints):
    with pytest.raises(ConfigError, match="SPLADE model pools its own vocabulary weights"):
        make_engine("--model-path", checkpoints["splade_bert"], "--pooling", "mean")


def test_the_family_follows_modules_json(checkpoints, tmp_path):
    """SpladePooling in modules.json picks SPLADE; BertForMaskedLM without it stays the dense BERT encoder."""
    spec, config = load_config(checkpoints["splade_bert"], tp_size=4)
    assert spec is splade.SPEC and config.splade == read_splade_pooling(checkpoints["splade_bert"])
    assert (config.splade.strategy, config.splade.activation) == ("max", "relu")
    assert (config.vocab_size, config.vocab_size_padded, config.embedding_size) == (450, 452, 450)
    _, distil = load_config(checkpoints["splade_distilbert"], tp_size=2)
    assert (distil.splade.activation, distil.type_vocab_size, distil.intermediate_size) == ("log1p_relu", 0, 128)
    assert load_config(checkpoints["splade_bert_untied"])[1].splade.strategy == "sum"
    dense_spec, dense = load_config(tm.make_bert(str(tmp_path / "bert_mlm"), with_prefix=True))
    assert dense_spec is bert.SPEC and dense.tasks == ("embed", "score", "rerank") and dense.splade is None
    # sentence-transformers' settings read around the SpladePooling module rather than failing on it
    st = SentenceTransformersConfig.read(checkpoints["splade_bert"])
    assert st.pooling is None and st.normalize is False and st.dense == ()


def add_splade_pooling(path: str, **config) -> str:
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_SpladePooling",
                    "type": "sentence_transformers.sparse_encoder.models.SpladePooling"}], f)
    os.makedirs(os.path.join(path, "1_SpladePooling"), exist_ok=True)
    with open(os.path.join(path, "1_SpladePooling", "config.json"), "w") as f:
        json.dump({"pooling_strategy": "max", "activation_function": "relu", **config}, f)
    return path


def test_unsupported_splade_architecture(tmp_path):
    """An XLMRobertaForMaskedLM with SpladePooling (not one SPLADE supports here) is refused by name."""
    path = add_splade_pooling(tm.make_xlm_roberta(str(tmp_path / "xlmr"), with_prefix=True))
    assert "XLMRobertaForMaskedLM" in ARCHITECTURES  # served, as a dense encoder, without SpladePooling
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == ("xlmr: a SPLADE model (modules.json has a SpladePooling module) of architecture "
                            "['XLMRobertaForMaskedLM']; supported: " + ", ".join(SPARSE_ARCHITECTURES))


def test_unsupported_splade_pooling(tmp_path):
    path = add_splade_pooling(tm.make_bert(str(tmp_path / "bert"), with_prefix=True), pooling_strategy="mean")
    with pytest.raises(ConfigError, match="SpladePooling with pooling_strategy 'mean' and activation_function "
                                          "'relu'; tp-embed supports pooling_strategy max or sum"):
        load_config(path)


def test_checkpoint_keys():
    """BERT's and DistilBERT's names land on the same modules."""
    name = splade.SPEC.checkpoint.param_name
    assert name("bert.encoder.layer.1.attention.self.key.weight") == ("layers.1.attention.qkv_proj.weight", "k")
    assert name("distilbert.transformer.layer.1.attention.k_lin.weight") == ("layers.1.attention.qkv_proj.weight", "k")
    assert name("distilbert.transformer.layer.0.attention.out_lin.bias") == ("layers.0.attention.dense.bias", None)
    assert name("distilbert.transformer.layer.0.sa_layer_norm.weight") == ("layers.0.attention.LayerNorm.weight", None)
    assert name("distilbert.transformer.layer.0.ffn.lin2.weight") == ("layers.0.output.weight", None)
    assert name("distilbert.transformer.layer.0.output_layer_norm.bias") == ("layers.0.output_norm.bias", None)
    assert name("bert.encoder.layer.0.output.LayerNorm.bias") == ("layers.0.output_norm.bias", None)
    assert name("cls.predictions.transform.LayerNorm.weight") == name("vocab_layer_norm.weight") == \
        ("head.norm.weight", None)
    assert name("cls.predictions.decoder.weight") == name("vocab_projector.weight") == ("head.decoder.weight", None)
    assert name("cls.predictions.decoder.bias") == ("head.decoder.bias", None)
    assert name("cls.predictions.bias") == ("head.bias", None)  # the decoder bias's source where not saved
    assert splade.SPEC.default_pooling is None and not splade.SPEC.prunes_last_layer


def test_a_router_model_is_refused(tmp_path):
    """OpenSearch's asymmetric encoders route queries and documents apart (a Router module): refused rather
    than served as a dense BERT with its query path's weights."""
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Router"}]))
    with pytest.raises(ConfigError, match="Router"):
        SentenceTransformersConfig.read(str(tmp_path))
