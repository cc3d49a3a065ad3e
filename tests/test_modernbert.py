"""ModernBERT at tp = 1, 2 and 4 (gloo, CPU, float32) against sentence-transformers with the same model directory:
cosine >= 0.99999 for every vector of MIXED_TEXTS (4 to 148 tokens, the local layers' window reaching 4 tokens
either side). Two layouts (tests/tiny_modernbert.py): gte-modernbert-base's (ModernBertModel, its old-style
config.json, CLS pooling) and modernbert-embed-base's pooling (mean) on a ModernBertForMaskedLM checkpoint with
every bias on. One torchrun job per tp embeds all of them, with the other new families' (tests/family_jobs.py).
"""

import json
import os

import numpy as np
import pytest

import tiny_models as tm
import tiny_modernbert as tmb
from dist_utils import assert_matches_reference, cosines
from dist_utils import load_output as load
from family_jobs import TPS

BOUND = 0.99999
TEXTS = tm.MIXED_TEXTS
VARIANTS = ("gte", "nomic")


@pytest.fixture(scope="module")
def checkpoints(family_jobs):
    """gte, nomic, and gte_full: gte with local_attention raised to cover every text. At tp = 1 gte also runs
    with PyTorch's attention (`gte_torch`), at tp = 2 gte_full too."""
    return {name: family_jobs.checkpoints[name] for name in VARIANTS + ("gte_full",)}


@pytest.fixture(scope="module")
def outputs(family_jobs):
    """{tp: output directory} of the shared job per tp (tests/family_jobs.py)."""
    return family_jobs.dirs


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: tm.st_encode(path, TEXTS) for name, path in checkpoints.items()}



def test_both_layer_kinds_and_long_texts(checkpoints, outputs):
    """The checkpoints have global and local layers, and the texts reach past the local window."""
    assert tmb.layer_types(checkpoints["gte"]) == ["full_attention", "sliding_attention", "sliding_attention",
                                                   "full_attention"]
    lengths = json.load(open(os.path.join(outputs[1], "gte.tokens.json")))
    window = tmb.LOCAL_ATTENTION // 2
    assert min(lengths) <= window + 1 and max(lengths) >= 20 * window


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", VARIANTS)
def test_matches_sentence_transformers(outputs, references, name, tp):
    assert_matches_reference(load(outputs, tp, name), references[name], f"{name} tp={tp}", BOUND)


def test_pytorch_attention_matches_too(outputs, references):
    assert cosines(load(outputs, 1, "gte_torch"), references["gte"]).min() >= BOUND


@pytest.mark.parametrize("tp", TPS)
def test_alone_equals_in_batch(outputs, tp):
    assert cosines(load(outputs, tp, "gte"), load(outputs, tp, "gte", "alone.npy")).min() >= BOUND


def test_the_window_matters(outputs, references):
    """With local_attention raised to cover every text, sentence-transformers' vectors change for every text with
    tokens farther apart than the window (and only those); served with that config, we follow it."""
    lengths = np.array(json.load(open(os.path.join(outputs[1], "gte.tokens.json"))))
    beyond = lengths > tmb.LOCAL_ATTENTION // 2 + 1
    cos = cosines(references["gte"], references["gte_full"])
    assert beyond.sum() >= 10 and cos[beyond].max() < 0.999, cos
    assert cos[~beyond].min() >= BOUND
    assert cosines(load(outputs, 2, "gte_full"), references["gte_full"]).min() >= BOUND
    assert cosines(load(outputs, 2, "gte"), references["gte_full"])[beyond].max() < 0.999


@pytest.mark.parametrize("name", VARIANTS)
def test_tp4_reads_and_holds_a_quarter(outputs, name):
    """Wqkv and Wi are single stacked tensors: each rank reads its rows of every part, never the whole."""
    full = json.load(open(os.path.join(outputs[1], f"{name}.rank0.json")))
    for rank in range(4):
        stats = json.load(open(os.path.join(outputs[4], f"{name}.rank{rank}.json")))
        ratio = stats["layer_param_bytes"] / full["layer_param_bytes"]
        assert 0.24 <= ratio <= 0.30, f"{name} rank {rank}: holds {ratio:.3f} of the layer weights"
        sharded = {n: f for n, f in stats["largest_read_fraction"].items()
                   if "norm" not in n and not n.endswith("Wo.bias")}  # norms and row-parallel biases are whole
        assert any("Wqkv" in n for n in sharded) and any("Wi" in n for n in sharded)
        # 0.26: rank 0 holds ceil(511 / 4) rows of the vocabulary, a hair over a quarter
        whole = {n: f for n, f in sharded.items() if f > 0.26}
        assert not whole, f"rank {rank} read more than its shard of {whole}"
