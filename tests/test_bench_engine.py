"""benchmarks/bench_engine.py: argument handling and result arithmetic, and one run on a tiny model."""

import argparse
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_engine  # noqa: E402
import gpu_check  # noqa: E402
import shapes  # noqa: E402
from tp_embed.models import load_config  # noqa: E402


def test_int_list():
    assert bench_engine.int_list("128,512, 2048") == [128, 512, 2048]
    for bad in ("", "a,1", "0", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_engine.int_list(bad)


def test_flops_per_token_of_e5_mistral_shape(tmp_path):
    _, cfg = load_config(gpu_check.write_shape_dir(str(tmp_path), gpu_check.E5_MISTRAL_SHAPE))
    h, layers, kv = 4096, 32, 8 * 128
    weights = h * (h + 2 * kv) + h * h + 3 * h * 14336  # q, k, v, o, gate/up/down per layer
    attention = 4 * 512 * 32 * 128 * 0.5  # causal halves q k^T and p v
    assert bench_engine.flops_per_token(cfg, 512) == layers * (2 * weights + attention)
    assert 14.0e9 < bench_engine.flops_per_token(cfg, 512) < 14.2e9


def test_format_table():
    points = [{"seq_len": 128, "batch_tokens": 1024, "num_seqs": 8, "tokens_per_s": 12345.6, "model_tflops": 1.5},
              {"seq_len": 512, "batch_tokens": 1024, "num_seqs": 2, "tokens_per_s": 999.0, "model_tflops": 0.25,
               "mfu": 0.5}]
    table = bench_engine.format_table(points)
    assert "| 128 | 1024 | 8 | 12,346 | 1.50 | n/a |" in table
    assert "| 512 | 1024 | 2 | 999 | 0.25 | 50.0% |" in table


def test_run_on_a_tiny_random_model(tmp_path):
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=500, max_position_embeddings=512)
    model = gpu_check.write_shape_dir(str(tmp_path / "m"), shape)
    out = tmp_path / "r.json"
    points = bench_engine.main(["--model-path", model, "--load-format", "dummy", "--seq-lens", "16,64",
                                "--batch-tokens", "128", "--warmup", "0", "--iters", "1", "--output-json", str(out)])
    assert [(p["seq_len"], p["num_seqs"]) for p in points] == [(16, 8), (64, 2)]
    assert all(p["tokens_per_s"] > 0 and "mfu" not in p for p in points)
    result = json.load(open(out))
    assert result["points"] == points and result["device"] == "cpu" and result["matmul_peak_tflops"] is None


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_every_shape_loads_as_its_family(tmp_path, name):
    """Each published shape writes a config the engine accepts, at the model's real sizes, and
    --shape-layers cuts only the layer count."""
    architecture, _, fields = shapes.SHAPES[name]
    spec, cfg = load_config(shapes.write_shape(str(tmp_path / name), name))
    assert architecture in spec.architectures
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (
        fields["hidden_size"], fields["num_hidden_layers"], fields["num_attention_heads"])
    _, cut = load_config(shapes.write_shape(str(tmp_path / f"{name}-2"), name, num_layers=2))
    assert cut.num_layers == 2 and cut.hidden_size == cfg.hidden_size


def test_run_a_published_shape(tmp_path):
    points = bench_engine.main(["--shape", "all-MiniLM-L6-v2", "--seq-lens", "16", "--batch-tokens", "64",
                                "--warmup", "0", "--iters", "1"])
    assert [(p["seq_len"], p["num_seqs"]) for p in points] == [(16, 4)] and points[0]["tokens_per_s"] > 0
