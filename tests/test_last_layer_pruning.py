"""Last-layer pruning: with cls or last pooling, the final layer's attention output projection and MLP run
on the pooled rows only (Engine.pooled_rows). For every family that prunes, the pruned forward pass returns
exactly the pooled rows of the full one, and the last layer's output has one row per input; mean pooling
and families that pool themselves never prune. The vectors against sentence-transformers at tp 1, 2 and 4
(tests/test_models.py, tests/family_jobs.py) run pruned wherever the pooling is cls or last."""

import argparse

import pytest
import torch

import tiny_gemma as tg
import tiny_models as tm
import tiny_modernbert as tmb
from tiny_mpnet import make_mpnet
from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.batch import Batch
from tp_embed.config import EngineConfig
from tp_embed.engine import Engine
from tp_embed.pooling import pool

CASES = {  # name -> (builder, --pooling or None for the model's own)
    "bert": (tm.make_bert, None),  # cls
    "mistral": (tm.make_mistral, None),  # last
    "mpnet": (make_mpnet, "cls"),
    "modernbert": (tmb.make_modernbert, None),  # cls
    "gemma2": (tg.make_gemma2, None),  # last
    "embeddinggemma": (tg.make_embeddinggemma, "last"),
}


def make_engine(*flags) -> Engine:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return Engine(EngineConfig.from_args(parse_with_config(p, list(flags))), show_progress=False)


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_rows_equal_the_full_pass(name, tmp_path):
    build, pooling = CASES[name]
    engine = make_engine("--model-path", build(str(tmp_path / name)), *(["--pooling", pooling] if pooling else []))
    seqs = engine.text.encode(tm.MIXED_TEXTS[:8], truncate=True)
    batch = Batch.from_token_ids(seqs)
    rows = engine.pooled_rows(batch)
    cu = batch.cu_seqlens.long()
    assert torch.equal(rows, cu[:-1] if engine.pooling == "cls" else cu[1:] - 1)
    shapes = []
    # a decoder layer returns (its output, the residual stream); an encoder layer its output
    engine.model.layers[-1].register_forward_hook(
        lambda module, args, out: shapes.append(tuple((out[0] if isinstance(out, tuple) else out).shape)))
    with torch.inference_mode():
        full = engine.model(batch, engine.attention_backend)
        pruned = engine.model(batch, engine.attention_backend, rows=rows)
    assert shapes[0][0] >= batch.num_tokens and shapes[1] == (len(seqs), engine.config.hidden_size)
    torch.testing.assert_close(pruned, full[rows], atol=1e-5, rtol=1e-5)
    vectors = engine.forward_pooled(seqs)  # the engine's own path, pruned
    expected = pool(full, batch.cu_seqlens, engine.pooling)
    if engine.dense is not None:
        expected = engine.dense(expected)
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-5)


def test_mean_pooling_does_not_prune(tmp_path):
    engine = make_engine("--model-path", tm.make_bert(str(tmp_path / "bert")), "--pooling", "mean")
    assert engine.pooled_rows(Batch.from_token_ids([[1, 2, 3], [4, 5]])) is None
