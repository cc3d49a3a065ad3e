"""--quantization fp8 (tp_embed/layers/fp8.py): the per-row FP8 rounding, the CPU reference linear layer
against a plain quantize-dequantize computation (oneDNN-packed and not), the real all-MiniLM-L6-v2's vectors
against float32, and on a Hopper GPU torch._scaled_mm against the same reference."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import EngineConfig
from tp_embed.engine import Engine
from tp_embed.layers import fp8
from tp_embed.layers.linear import ColumnParallelLinear, RowParallelLinear, prepack_linears, quantize_linears


def test_quantize_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.0])[:, None]
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    # each row's largest magnitude lands on e4m3's largest value; an all-zero row keeps a finite scale
    torch.testing.assert_close(q[:4].float().abs().amax(1), torch.full((4,), fp8.FP8_MAX))
    assert torch.isfinite(scale).all() and (q[4].float() == 0).all()
    # three mantissa bits: every element within half an ulp (1/16 of its magnitude) of the original
    back = fp8.fake_quantize_rows(x)
    big = x.abs() > x.abs().amax(1, keepdim=True) / 64  # normal range of e4m3 for its row
    assert ((back - x).abs()[big] <= x.abs()[big] / 16 + 1e-12).all()
    assert not torch.equal(back[:4], x[:4])


@pytest.mark.parametrize("packed", [False, True], ids=["torch", "onednn"])
@pytest.mark.parametrize("layer", ["column", "row"])
def test_cpu_reference_layer(layer, packed):
    """The layer's output is F.linear of the FP8-rounded input and weight, plus bias, GELU and residual."""
    gen = torch.Generator().manual_seed(1)
    lin = ColumnParallelLinear(48, 80, bias=True, activation="gelu") if layer == "column" else \
        RowParallelLinear(48, 80, bias=True)
    for p in lin.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    assert quantize_linears(lin) == 1 and lin.fp8_reference
    if packed:
        assert prepack_linears(lin) == 1
    x, res = torch.randn(7, 48, generator=gen), torch.randn(7, 80, generator=gen)
    ref = F.linear(fp8.fake_quantize_rows(x), fp8.fake_quantize_rows(w), b)
    if layer == "column":
        torch.testing.assert_close(lin(x), F.gelu(ref), atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(lin(x, residual=res), ref + res, atol=1e-4, rtol=1e-4)
    assert (lin(x) - (F.gelu(F.linear(x, w, b)) if layer == "column" else F.linear(x, w, b))).abs().max() > 1e-3


def make_engine(*flags) -> Engine:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return Engine(EngineConfig.from_args(parse_with_config(p, list(flags))), show_progress=False)


def test_minilm_fp8_reference_against_float32():
    """The real all-MiniLM-L6-v2 on the test texts: FP8 weights and activations cost this much cosine
    (measured on this project's CPU machine: min 0.9958, median 0.9974), and no text falls apart."""
    ref, quant = make_engine(), make_engine("--quantization", "fp8")
    assert quant.options.quantization == "fp8"
    texts = tm.MIXED_TEXTS + [tm.LONG_TEXT]
    seqs = ref.text.encode(texts, truncate=True)
    a, b = ref.embed(seqs).numpy(), quant.embed(seqs).numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.995, cos
    assert cos.max() < 0.99999, "the quantization must change the vectors"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a GPU with row-wise FP8 matmuls (compute capability 9.0+)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_mm_matches_the_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    lin = ColumnParallelLinear(256, 512, bias=True).cuda().to(dtype)
    for p in lin.parameters():
        p.data = torch.randn(p.shape, generator=gen).cuda().to(dtype)
    w, b = lin.weight.detach().float(), lin.bias.detach().float()
    quantize_linears(lin)
    assert lin.fp8_weight is not None and lin.weight.numel() == 0
    x = torch.randn(37, 256, generator=gen).cuda().to(dtype)  # rows padded to 48 for the kernel
    ref = F.linear(fp8.fake_quantize_rows(x.float()), fp8.fake_quantize_rows(w), b)
    out = lin(x).float()
    assert out.shape == (37, 512)
    assert (out - ref).norm() / ref.norm() < 1e-2
