"""The CPU float32 linear path: oneDNN-packed weights (bias, GELU and residual fused) against F.linear,
layer by layer and for a whole model."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import EngineConfig
from tp_embed.engine import Engine
from tp_embed.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    bucket_rows,
    named_weights,
    onednn_available,
    prepack_linears,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch is built without oneDNN")


def filled(layer, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return layer


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_column_layer_packed_equals_f_linear(activation, bias):
    layer = filled(ColumnParallelLinear(48, 80, bias=bias, activation=activation), 0)
    x = torch.randn(13, 48, generator=torch.Generator().manual_seed(1))
    y = F.linear(x, layer.weight, layer.bias)
    if activation:
        y = F.gelu(y, approximate="none" if activation == "gelu" else "tanh")
    torch.testing.assert_close(layer(x), y)  # unpacked path
    assert prepack_linears(layer) == 1
    assert layer.weight.numel() == 0  # the plain copy is released
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_row_layer_packed_equals_f_linear(with_residual, bias):
    layer = filled(RowParallelLinear(80, 48, bias=bias), 2)
    x = torch.randn(7, 80, generator=torch.Generator().manual_seed(3))
    residual = torch.randn(7, 48, generator=torch.Generator().manual_seed(4)) if with_residual else None
    y = F.linear(x, layer.weight, layer.bias) + (residual if with_residual else 0)
    torch.testing.assert_close(layer(x, residual=residual), y)
    prepack_linears(layer)
    torch.testing.assert_close(layer(x, residual=residual), y, atol=1e-5, rtol=1e-5)


def test_bucket_rows_bounds_the_shapes_and_the_padding():
    sizes = [bucket_rows(n) for n in range(1, 8193)]
    assert all(b >= n for n, b in enumerate(sizes, 1))
    assert sizes == sorted(sizes)  # more rows never run at a smaller size
    assert all(b - n < 8 for n, b in enumerate(sizes[:256], 1))
    assert all(b <= n * 9 / 8 for n, b in enumerate(sizes, 1) if n > 256)
    assert len(set(sizes)) == 72  # kernels oneDNN compiles, at most, per weight shape
    assert all(bucket_rows(b) == b for b in set(sizes))


@pytest.mark.parametrize("shape", [(300,), (2, 45), (256,)])
def test_packed_layers_take_any_row_count_and_leading_shape(shape):
    """Rows are padded to bucket_rows and the padding cut off again: 300 runs at 320, 2 x 45 at 96."""
    column = filled(ColumnParallelLinear(48, 80, bias=True, activation="gelu"), 5)
    row = filled(RowParallelLinear(80, 48, bias=True), 6)
    x = torch.randn(*shape, 48, generator=torch.Generator().manual_seed(7))
    expected = row(column(x), residual=x)
    prepack_linears(column), prepack_linears(row)
    out = row(column(x), residual=x)
    assert out.shape == (*shape, 48)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="cannot be fused"):
        ColumnParallelLinear(8, 8, bias=True, activation="relu")


def test_named_weights_counts_the_packed_copy():
    layer = filled(ColumnParallelLinear(48, 80, bias=True), 0)
    before = {n: t.numel() * t.element_size() for n, t in named_weights(layer)}
    prepack_linears(layer)
    after = {n: t.numel() * t.element_size() for n, t in named_weights(layer)}
    assert before == after == {"weight": 80 * 48 * 4, "bias": 80 * 4}


def make_engine(*flags):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return Engine(EngineConfig.from_args(parse_with_config(p, list(flags))), show_progress=False)


def test_minilm_onednn_equals_torch_matmul():
    # the real all-MiniLM-L6-v2 (GELU fused into its intermediate layer, residuals into its outputs)
    texts = ["a short one", "a somewhat longer sentence about packed weights and fused kernels " * 5,
             "x", "tensor parallel embeddings on a CPU"]
    fast, plain = make_engine("--cpu-matmul", "onednn"), make_engine("--cpu-matmul", "torch")
    assert (fast.cpu_matmul, plain.cpu_matmul) == ("onednn", "torch")
    sequences = fast.text.encode(texts, truncate=True)
    a, b = fast.embed(sequences).numpy(), plain.embed(sequences).numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999999
    # alone == in a batch on the per-sequence attention path
    np.testing.assert_allclose(fast.embed(sequences[1:2]).numpy()[0], a[1], atol=1e-5)
