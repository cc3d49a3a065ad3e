"""The real all-MiniLM-L6-v2 (the embedded default model) at tp = 1, 2 and 3 (12 heads) against
SentenceTransformer(...).encode(normalize_embeddings=True), with truncation of texts longer than its
max_seq_length done the way sentence-transformers does it."""

import numpy as np
import pytest

import tiny_models as tm
from dist_utils import cosines, embed_models
from tp_embed.model_path import default_model_dir

TEXTS = tm.MIXED_TEXTS + [
    "A man is eating food.", "A man is riding a horse.", "The new movie is awesome!",
    "Die Katze sitzt auf der Matte.", "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El aprendizaje automático transforma la industria.", "Это предложение на русском языке.",
    "これは日本語の文です。", "这是一个中文句子。", "이것은 한국어 문장입니다.", "Ελληνικά γράμματα αβγ",
    "emoji 🚀🔥 and symbols ∑∫√", "", " ".join(["long"] * 400), tm.LONG_TEXT * 3,
    "Tabs\tand\nnewlines\r\nmixed", "UPPER CASE TEXT", "a" * 1000,
]


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_model_dir(), device="cpu")
    assert model.max_seq_length == 256
    return model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = {}
    for tp in (1, 2, 3):
        d = str(tmp_path_factory.mktemp(f"minilm{tp}"))
        # no --model-path: the embedded default
        embed_models(tp, d, TEXTS, [{"name": "minilm", "flags": ["--truncate"]}])
        out[tp] = d
    return out


def test_texts_cover_the_cases():
    assert len(TEXTS) >= 32
    assert any(not t.isascii() for t in TEXTS)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_minilm_matches_sentence_transformers(outputs, reference, tp):
    ours = np.load(f"{outputs[tp]}/minilm.npy")
    assert ours.shape == (len(TEXTS), 384)
    cos = cosines(ours, reference)
    assert cos.min() >= 0.99999, f"tp={tp}: min cosine {cos.min():.7f} at text {cos.argmin()}"


def test_long_texts_were_truncated_to_max_seq_length(outputs):
    import json
    lengths = json.load(open(f"{outputs[1]}/minilm.tokens.json"))
    assert max(lengths) == 256
    assert sum(n == 256 for n in lengths) >= 2  # the repeated-word and LONG_TEXT inputs
