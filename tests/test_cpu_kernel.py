"""The compiled CPU attention kernel (tp_embed/kernels): against a float64 reference on packed batches
with strided q/k/v, causal and not, grouped-query heads, lengths around its vector and tile sizes; the
attention layer's use of it; its input checks; and what happens without a compiler."""

import logging
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from test_attention import reference
from tp_embed import kernels
from tp_embed.config import ConfigError
from tp_embed.engine import Engine
from tp_embed.layers.attention import CpuKernelAttention, PerSequenceAttention, plan_attention

ERROR = kernels.load_cpu_attention()
needs_kernel = pytest.mark.skipif(ERROR is not None, reason=f"CPU attention kernel unavailable: {ERROR}")


def fused_qkv(lens, heads, kv_heads, head_dim, seed=0, scale=1.0):
    """q, k, v as views into one [T, heads + 2 kv_heads, head_dim] tensor, as the models produce them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lens), heads + 2 * kv_heads, head_dim, generator=gen) * scale
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    cu = torch.tensor([0, *lens]).cumsum(0)
    return q, k, v, cu


def run_kernel(q, k, v, cu, causal):
    out = torch.empty(q.shape)
    torch.ops.tp_embed.varlen_attention(q, k, v, cu, causal, q.shape[-1] ** -0.5, out)
    return out


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 12, 32), (4, 2, 64), (8, 1, 128), (3, 3, 16), (2, 2, 80)])
@pytest.mark.parametrize("lens", [[1], [1, 15, 16, 17], [7, 31, 33, 64, 100], [257, 3], [600]],
                         ids=["one-token", "around-16", "mixed", "over-256", "three-tasks"])
def test_kernel_matches_reference(causal, heads, kv_heads, head_dim, lens):
    q, k, v, cu = fused_qkv(lens, heads, kv_heads, head_dim, seed=len(lens) + head_dim)
    out = run_kernel(q, k, v, cu, causal)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, causal), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_with_large_scores():
    """Scores spread over hundreds (exp underflows for most keys): float32 scores that large carry
    absolute errors of ~1e-5, so the kernel is held to PyTorch's own float32 error, not a fixed bound."""
    q, k, v, cu = fused_qkv([50, 130], 4, 4, 32, seed=5, scale=6.0)
    ref = reference(q, k, v, cu, False)
    kernel_error = (run_kernel(q, k, v, cu, causal=False).double() - ref).abs().max().item()
    torch_path = plan_attention(cu.to(torch.int32), 130, 4, 4, 32, False, torch.float32, backend="sdpa")
    torch_error = (torch_path.run(q, k, v).double() - ref).abs().max().item()
    assert kernel_error <= 2 * torch_error + 1e-6


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_attention_layer_uses_the_kernel(causal):
    """backend "cpu_kernel" gives what the per-sequence PyTorch path gives; head dims the kernel does not
    take (24) fall back to that path."""
    lens = [5, 120, 40]
    q, k, v, cu = fused_qkv(lens, 6, 3, 64, seed=1)
    cu32 = cu.to(torch.int32)
    kernel = plan_attention(cu32, max(lens), 6, 3, 64, causal, torch.float32, backend="cpu_kernel")
    assert isinstance(kernel, CpuKernelAttention)
    torch_path = plan_attention(cu32, max(lens), 6, 3, 64, causal, torch.float32, backend="sdpa")
    torch.testing.assert_close(kernel.run(q, k, v), torch_path.run(q, k, v), atol=2e-6, rtol=1e-5)
    odd = plan_attention(cu32, max(lens), 6, 3, 24, causal, torch.float32, backend="cpu_kernel")
    assert isinstance(odd, PerSequenceAttention)
    q24, k24, v24, _ = fused_qkv(lens, 6, 3, 24, seed=2)
    torch.testing.assert_close(odd.run(q24, k24, v24).double(), reference(q24, k24, v24, cu, causal), atol=1e-5,
                               rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("case,message", [
    ("short_cu", "cu_seqlens must run from 0 to num_tokens"),
    ("decreasing", "must not decrease"),
    ("odd_head_dim", "multiple of 16"),
    ("bad_groups", "multiple of key/value heads"),
    ("dtype", "float32 only"),
    ("out", "out must be contiguous"),
    ("bias_heads", "rel_bias must be a contiguous float32"),
    ("bias_short", "needs C \\+ 1 >= every sequence's length"),
])
def test_kernel_refuses_bad_input(case, message):
    q, k, v, cu = fused_qkv([4, 6], 4, 2, 32)
    out = torch.empty(q.shape)
    if case == "short_cu":
        cu = torch.tensor([0, 4])
    elif case == "decreasing":
        cu = torch.tensor([0, 6, 4, 10])
    elif case == "odd_head_dim":
        q, k, v, cu = fused_qkv([4, 6], 4, 2, 24)
        out = torch.empty(q.shape)
    elif case == "bad_groups":
        q, k, v, cu = fused_qkv([4, 6], 4, 3, 32)
        out = torch.empty(q.shape)
    elif case == "dtype":
        q = q.double()
    elif case == "out":
        out = torch.empty(q.shape[0], q.shape[2], q.shape[1]).transpose(1, 2)
    bias = {"bias_heads": torch.zeros(3, 11), "bias_short": torch.zeros(4, 9)}.get(case)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tp_embed.varlen_attention(q, k, v, cu, False, 0.1, out, rel_bias=bias)


def test_library_name_follows_source_cpu_and_torch(monkeypatch, tmp_path):
    """The cached binary's name changes with anything it was built for, so a stale one is never loaded."""
    monkeypatch.setenv("TP_EMBED_CACHE", str(tmp_path))
    cxx = kernels.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    base = kernels.library_path(cxx)
    assert base.parent == tmp_path / "kernels" and base.name.startswith("varlen_attention-")
    monkeypatch.setattr(kernels, "cpu_identity", lambda: "model name: another CPU")
    other_cpu = kernels.library_path(cxx)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    other_torch = kernels.library_path(cxx)
    assert len({base, other_cpu, other_torch}) == 3


def test_without_a_compiler(monkeypatch, tmp_path):
    """No compiler: load_cpu_attention says why; the engine's auto choice falls back to PyTorch with a
    warning, and --cpu-attention kernel refuses to start."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    error = kernels.load_cpu_attention()
    assert error is not None and "no C++ compiler" in error
    assert kernels.load_cpu_attention() == error  # remembered, not retried per batch

    def choose(cpu_attention, device="cpu", dtype=torch.float32, backend="auto"):
        options = SimpleNamespace(cpu_attention=cpu_attention, attention_backend=backend)
        engine = SimpleNamespace(device=torch.device(device), dtype=dtype, is_driver=True, options=options)
        return Engine.choose_attention(engine)

    with pytest.raises(ConfigError, match="--cpu-attention kernel: .*no C\\+\\+ compiler"):
        choose("kernel")
    assert choose("torch") == "auto"
    assert choose("kernel", dtype=torch.bfloat16) == "auto"  # the kernel is float32 only: never asked
    assert choose("kernel", backend="sdpa") == "sdpa"


def test_auto_warns_once_without_a_compiler(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    options = SimpleNamespace(cpu_attention="auto", attention_backend="auto")
    engine = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, is_driver=True, options=options)
    with caplog.at_level(logging.WARNING, logger="tp_embed"):
        assert Engine.choose_attention(engine) == "auto"
    assert "could not be built" in caplog.text and "--cpu-attention torch" in caplog.text


@needs_kernel
def test_engine_chooses_the_kernel():
    options = SimpleNamespace(cpu_attention="auto", attention_backend="auto")
    engine = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, is_driver=True, options=options)
    assert Engine.choose_attention(engine) == "cpu_kernel"


def test_failed_build_reports_the_compiler_error(monkeypatch, tmp_path):
    """A compiler that fails: the message carries its output, nothing half-written stays in the cache."""
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'error: no such header' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("TP_EMBED_CACHE", str(tmp_path / "cache"))
    error = kernels.load_cpu_attention()
    assert error is not None and "exited with 1" in error and "no such header" in error
    assert not any((tmp_path / "cache" / "kernels").iterdir())


RANK_SCRIPT = """
import os, sys, time
from pathlib import Path
work = Path(sys.argv[1])
(work / f"ready-{sys.argv[2]}").touch()
while not (work / "go").exists():
    time.sleep(0.01)
from tp_embed.kernels import load_cpu_attention
print(load_cpu_attention())
"""


@needs_kernel
def test_ranks_on_a_cold_cache_build_once(tmp_path):
    """Three processes asking for the kernel at the same moment on an empty cache: one compiles, the
    other two wait for it and load its binary. The compiler stands in for c++: it logs each build, takes
    a second, and writes the binary this session already built."""
    built = kernels.library_path(kernels.compiler())
    log = tmp_path / "builds.log"
    fake = tmp_path / "fake-cxx"
    fake.write_text(f"#!{sys.executable}\n"
                    "import shutil, sys, time\n"
                    "if sys.argv[1] == '--version':\n    print('fake 1.0'); sys.exit(0)\n"
                    f"open({str(log)!r}, 'a').write('build\\n')\n"
                    "time.sleep(1)\n"
                    f"shutil.copy({str(built)!r}, sys.argv[sys.argv.index('-o') + 1])\n")
    fake.chmod(0o755)
    env = {**os.environ, "CXX": str(fake), "TP_EMBED_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [out.strip() for out, _ in outputs] == ["None"] * 3, [err[-2000:] for _, err in outputs]
    assert log.read_text() == "build\n"
    assert len(list((tmp_path / "cache" / "kernels").iterdir())) == 1  # the binary, no temporary left


def test_reference_is_softmax_attention():
    """The reference itself, on a case worked by hand: one query, two keys."""
    q = torch.tensor([[[1.0, 0.0]]]).repeat(2, 1, 1)
    k = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    v = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    cu = torch.tensor([0, 2])
    w = math.exp(1 / math.sqrt(2))
    p = w / (w + 1)
    out = reference(q, k, v, cu, causal=False)
    assert out[0, 0].tolist() == pytest.approx([p * 1 + (1 - p) * 3, p * 2 + (1 - p) * 4])


@pytest.mark.parametrize("backend", ["cpu_kernel", "sdpa"])
@pytest.mark.parametrize("lens", [[25], [5, 20]])
def test_rows_past_the_batch_come_back_as_zeros(backend, lens):
    """A model that pads its rows once for the packed linear layers hands attention more rows than the
    batch has tokens: the tokens' rows are attended as without padding, the padding rows are zeros."""
    if backend == "cpu_kernel" and ERROR is not None:
        pytest.skip(f"CPU attention kernel unavailable: {ERROR}")
    num_tokens, rows = sum(lens), 32
    q, k, v, _ = fused_qkv([rows], 4, 4, 32, seed=9)
    cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    attn = plan_attention(cu, max(lens), 4, 4, 32, False, torch.float32, backend=backend)
    out = attn.run(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out[:num_tokens].double(), reference(q, k, v, cu.long(), False)[:num_tokens],
                               atol=2e-6, rtol=1e-5)
    assert torch.equal(out[num_tokens:], torch.zeros(rows - num_tokens, 4, 32))
