"""Gemma 2 (bge-multilingual-gemma2 style) and Gemma 3 text (EmbeddingGemma style, and a causal
Gemma3ForCausalLM) at tp = 1, 2 and 4 (gloo, CPU, float32) against sentence-transformers with the same model
directory: cosine >= 0.99999 for every vector. One torchrun job per tp embeds all of them, with the other new
families' (tests/family_jobs.py). The references are shown to depend on what they test: Gemma 2's attention
soft-cap, and each sliding window to within one token.
"""

import json
import os

import pytest

import tiny_gemma as tg
import tiny_models as tm
from dist_utils import assert_matches_reference, cosines
from dist_utils import load_output as load
from family_jobs import TPS
from tp_embed.errors import ConfigError
from tp_embed.models import gemma, load_config

BOUND = 0.99999
TEXTS = tm.MIXED_TEXTS
NAMES = ("gemma2", "embeddinggemma", "gemma3_causal")


@pytest.fixture(scope="module")
def checkpoints(family_jobs):
    return {name: family_jobs.checkpoints[name] for name in NAMES}


@pytest.fixture(scope="module")
def outputs(family_jobs):
    """{tp: output directory} of the shared job per tp (tests/family_jobs.py): each model, embeddinggemma also
    with prompt_name "query", and at tp = 2 gemma2 without its soft-cap."""
    return family_jobs.dirs



@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: tm.st_encode(path, TEXTS) for name, path in checkpoints.items()}


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_sentence_transformers(outputs, references, name, tp):
    assert_matches_reference(load(outputs, tp, name), references[name], f"{name} tp={tp}", BOUND)


@pytest.mark.parametrize("tp", TPS)
def test_alone_equals_in_batch(outputs, tp):
    cos = cosines(load(outputs, tp, "embeddinggemma"), load(outputs, tp, "embeddinggemma", "alone.npy"))
    assert cos.min() >= BOUND


def test_prompt_name(outputs, checkpoints, references):
    """EmbeddingGemma's "query" prompt, as sentence-transformers prepends it (and mean-pools over it)."""
    ref = tm.st_encode(checkpoints["embeddinggemma"], TEXTS, prompt_name="query")
    assert cosines(ref, references["embeddinggemma"]).min() < 0.999  # the prompt matters
    for tp in TPS:
        assert cosines(load(outputs, tp, "embeddinggemma_query"), ref).min() >= BOUND


def test_softcap_matters(outputs, checkpoints, references, tmp_path):
    """Without Gemma 2's soft-cap the vectors differ, and tp-embed told to drop it gives exactly those."""
    no_cap = tm.st_encode(tg.with_config(checkpoints["gemma2"], str(tmp_path / "g2"), attn_logit_softcapping=None),
                          TEXTS)
    assert cosines(no_cap, references["gemma2"]).min() < 0.999
    ours = load(outputs, 2, "gemma2_no_softcap")
    assert cosines(ours, no_cap).min() >= BOUND
    assert cosines(ours, references["gemma2"]).min() < 0.999


# config.json's sliding_window one key wider on each side the window reaches: +1 causal, +2 bidirectional
# (Gemma3TextConfig reads w as w // 2 + 1)
WIDER = {"gemma2": tg.SLIDING_WINDOW + 1, "embeddinggemma": tg.SLIDING_WINDOW + 2,
         "gemma3_causal": tg.SLIDING_WINDOW + 1}
# the largest key distance the sliding layers see
WINDOW = {"gemma2": tg.SLIDING_WINDOW - 1, "embeddinggemma": tg.SLIDING_WINDOW // 2,
          "gemma3_causal": tg.SLIDING_WINDOW - 1}


@pytest.mark.parametrize("name", NAMES)
def test_window_matters(outputs, checkpoints, references, name, tmp_path):
    """The texts are shorter and longer than the window, and a reference whose window is one key wider, or
    as wide as any text, differs from the one that tp-embed matches."""
    lengths = json.load(open(os.path.join(outputs[1], f"{name}.tokens.json")))
    assert min(lengths) <= WINDOW[name] < max(lengths)
    for window in (WIDER[name], 4096):
        ref = tm.st_encode(tg.with_config(checkpoints[name], str(tmp_path / str(window)), sliding_window=window), TEXTS)
        assert cosines(ref, references[name]).min() < 0.999, f"sliding_window {window}"


def test_valid_tp(tmp_path):
    """EmbeddingGemma's 3 heads and 1 KV head: tp 1 or 3; the error for another names them."""
    from transformers import Gemma3TextConfig

    Gemma3TextConfig(hidden_size=48, intermediate_size=32, num_hidden_layers=2, num_attention_heads=3,
                     num_key_value_heads=1, head_dim=16, vocab_size=100, use_bidirectional_attention=True,
                     architectures=["Gemma3TextModel"]).save_pretrained(tmp_path)
    accepted = []
    for tp in range(1, 9):
        try:
            spec, config = load_config(str(tmp_path), tp_size=tp)
            accepted.append(tp)
        except ConfigError as e:
            assert "use tp in {1, 3}" in str(e)
    assert accepted == [1, 3]
    assert spec is gemma.GEMMA3_SPEC and not config.causal and config.qk_norm
