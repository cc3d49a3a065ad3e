"""The real all-MiniLM-L6-v2 (the embedded default model) at tp = 1, 2, 3 (12 heads, an odd split) and 4 against
SentenceTransformer(...).encode(normalize_embeddings=True), with truncation of texts longer than its
max_seq_length done the way sentence-transformers does it. tp 1, 2 and 4 come from the shared torchrun job per
tp (tests/family_jobs.py); tp 3 runs its own."""

import numpy as np
import pytest

from dist_utils import cosines, embed_models
from family_jobs import MINILM, TPS
from family_jobs import MINILM_TEXTS as TEXTS
from tp_embed.model_path import default_model_dir


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_model_dir(), device="cpu")
    assert model.max_seq_length == 256
    return model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)


@pytest.fixture(scope="module")
def outputs(family_jobs, tmp_path_factory):
    out = dict(family_jobs.dirs)
    out[3] = str(tmp_path_factory.mktemp("minilm3"))
    embed_models(3, out[3], TEXTS, [MINILM])
    return out


def test_texts_cover_the_cases():
    assert len(TEXTS) >= 32
    assert any(not t.isascii() for t in TEXTS)


@pytest.mark.parametrize("tp", sorted(TPS + (3,)))
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
