"""Packed-batch attention: every CPU backend against a float64 per-sequence reference, FlashInfer against
padded SDPA and the reference on a GPU (bf16, causal and bidirectional, GQA, several head dims), and the
choice of backend. The score modifiers (sliding window on both sides and causal, relative position bias,
soft-capping, a given scale) against the same reference in every backend."""

import inspect
import math

import pytest
import torch

from tp_embed import kernels
from tp_embed.layers.attention import (
    CpuKernelAttention,
    FlashInferAttention,
    PaddedSdpaAttention,
    PerSequenceAttention,
    flashinfer_available,
    per_sequence,
    plan_attention,
    select_attention,
)

KERNEL_ERROR = kernels.load_cpu_attention()
CPU_BACKENDS = [PerSequenceAttention, PaddedSdpaAttention,
                pytest.param(CpuKernelAttention, marks=pytest.mark.skipif(
                    KERNEL_ERROR is not None, reason=f"CPU attention kernel unavailable: {KERNEL_ERROR}"))]


def random_packed(lens, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, num_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


def reference(q, k, v, cu, causal, scale=None, window=None, softcap=None, rel_bias=None):
    """Plain softmax attention, one sequence at a time, in float64, with the modifiers written out per score."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        qs = q[s:e].double().cpu().transpose(0, 1)  # [heads, L, head_dim]
        ks = k[s:e].double().cpu().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[s:e].double().cpu().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i, j = torch.meshgrid(torch.arange(e - s), torch.arange(e - s), indexing="ij")  # query, key
        if rel_bias is not None:
            scores += rel_bias.double()[:, j - i + (rel_bias.shape[1] - 1) // 2]
        if causal:
            scores[:, j > i] = float("-inf")
        if window is not None:
            scores[:, (i - j).abs() > window] = float("-inf")
        out[s:e] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def planned(backend, cu, max_seqlen, heads, kv_heads, head_dim, causal, dtype=torch.float32):
    attn = backend(heads, kv_heads, head_dim, causal, dtype)
    attn.plan(cu, max_seqlen)
    return attn


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (8, 2, 16), (4, 1, 64)])
@pytest.mark.parametrize("lens", [[5], [1, 7, 3, 12], [9, 9]])
@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda cls: cls.__name__)
def test_matches_reference(causal, heads, kv_heads, head_dim, lens, backend):
    q, k, v, cu = random_packed(lens, heads, kv_heads, head_dim, torch.float32, "cpu")
    out = planned(backend, cu, max(lens), heads, kv_heads, head_dim, causal).run(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_short_and_long_sequences_on_the_cpu(causal, monkeypatch):
    """Per sequence on the CPU, short float32 sequences take two matmuls and long ones SDPA: both paths,
    side by side in one batch, match the reference, and SDPA alone gives the same."""
    lens = [40, 300, 3]  # x 32 head dims: 1280 and 96 elements are short, 9600 is long
    assert 40 * 32 <= per_sequence.SHORT_SEQUENCE_ELEMENTS < 300 * 32
    q, k, v, cu = random_packed(lens, 4, 4, 32, torch.float32, "cpu", seed=3)
    attn = planned(PerSequenceAttention, cu, max(lens), 4, 4, 32, causal)
    out = attn.run(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, causal), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(per_sequence, "SHORT_SEQUENCE_ELEMENTS", 0)  # SDPA for every sequence
    torch.testing.assert_close(attn.run(q, k, v), out, atol=1e-5, rtol=1e-5)


MODIFIERS = {
    "window": dict(window=3),
    "window0": dict(window=0),  # each token sees itself only
    "bias": dict(rel_bias=True),
    "softcap": dict(softcap=2.0),
    "scale": dict(scale=0.5),  # Gemma's query_pre_attn_scalar ** -0.5, not head_dim ** -0.5
    "all": dict(window=5, rel_bias=True, softcap=3.0, scale=0.3),
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (4, 2, 16)])
@pytest.mark.parametrize("modifier", list(MODIFIERS))
@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda cls: cls.__name__)
def test_modifiers_match_reference(causal, heads, kv_heads, head_dim, modifier, backend):
    """Sliding window (both sides, or the left when causal), relative bias, soft-cap and scale: sequences
    shorter and longer than the window, one of a single token, in one packed batch."""
    lens = [1, 7, 3, 12, 40]
    q, k, v, cu = random_packed(lens, heads, kv_heads, head_dim, torch.float32, "cpu", seed=5)
    q, k = q * 3, k * 3  # large scores, so the soft-cap bends them
    kw = dict(MODIFIERS[modifier])
    if kw.get("rel_bias"):
        kw["rel_bias"] = torch.randn(heads, 2 * max(lens) - 1, generator=torch.Generator().manual_seed(9))
    attn = backend(heads, kv_heads, head_dim, causal, torch.float32, scale=kw.get("scale"),
                   window=kw.get("window"), softcap=kw.get("softcap"))
    attn.plan(cu, max(lens), kw.get("rel_bias"))
    out = attn.run(q, k, v)
    expected = reference(q, k, v, cu, causal, **kw)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    assert (expected - reference(q, k, v, cu, causal)).abs().max() > 1e-2, "the modifier must change the output"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda cls: cls.__name__)
def test_window_on_long_sequences(causal, backend):
    """Sequences past the kernel's row blocks and tasks (32 and 256 rows) with a window smaller than both:
    the kernel computes only the keys inside, and must still see all of them."""
    lens = [600, 70]
    q, k, v, cu = random_packed(lens, 2, 1, 16, torch.float32, "cpu", seed=7)
    rel = torch.randn(2, 2 * max(lens) - 1, generator=torch.Generator().manual_seed(3))
    attn = plan_attention(cu, max(lens), 2, 1, 16, causal, torch.float32,
                          "cpu_kernel" if backend is CpuKernelAttention else "sdpa", window=45, rel_bias=rel)
    if backend is PaddedSdpaAttention:
        attn = backend(2, 1, 16, causal, torch.float32, window=45)
        attn.plan(cu, max(lens), rel)
    assert type(attn) is backend
    expected = reference(q, k, v, cu, causal, window=45, rel_bias=rel)
    torch.testing.assert_close(attn.run(q, k, v).double(), expected, atol=2e-5, rtol=2e-5)


def test_plan_attention_checks_its_modifiers():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="rel_bias must be"):
        plan_attention(cu, 5, 2, 2, 16, False, torch.float32, rel_bias=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="window must be >= 0"):
        plan_attention(cu, 5, 2, 2, 16, False, torch.float32, window=-1)


def test_flashinfer_is_not_chosen_for_what_it_cannot_do():
    """FlashInfer takes a causal window and a soft-cap, not a relative bias nor a window on both sides: those go
    to padded SDPA on CUDA, and asking for FlashInfer by name is an error."""
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="relative position bias"):
        select_attention(cuda, torch.bfloat16, 64, "flashinfer", bias=True)
    with pytest.raises(ValueError, match="both sides"):
        select_attention(cuda, torch.bfloat16, 64, "flashinfer", two_sided_window=True)
    assert select_attention(cuda, torch.bfloat16, 64, "auto", bias=True) is PaddedSdpaAttention
    assert select_attention(cuda, torch.bfloat16, 64, "auto", two_sided_window=True) is PaddedSdpaAttention
    with pytest.raises(ValueError, match="window_left"):
        FlashInferAttention(2, 2, 64, False, torch.bfloat16, window=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda cls: cls.__name__)
def test_sequences_do_not_see_each_other(backend):
    q, k, v, cu = random_packed([4, 6], 2, 2, 16, torch.float32, "cpu")
    alone = planned(backend, cu[:2], 4, 2, 2, 16, False).run(q[:4], k[:4], v[:4])
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 10.0  # changing the second sequence must not move the first one's output
    v2[4:] -= 3.0
    packed = planned(backend, cu, 6, 2, 2, 16, False).run(q, k2, v2)
    torch.testing.assert_close(packed[:4], alone, atol=1e-6, rtol=1e-6)


def test_select_attention_on_the_cpu():
    """The compiled kernel only where asked for and where it takes the case (float32, head dim a multiple
    of 16); every other CPU case one sequence at a time, "sdpa" included; FlashInfer never."""
    cpu = torch.device("cpu")
    assert select_attention(cpu, torch.float32, 64, "cpu_kernel") is CpuKernelAttention
    assert select_attention(cpu, torch.float32, 32, "cpu_kernel") is CpuKernelAttention
    assert select_attention(cpu, torch.float32, 24, "cpu_kernel") is PerSequenceAttention
    assert select_attention(cpu, torch.bfloat16, 64, "cpu_kernel") is PerSequenceAttention
    assert select_attention(cpu, torch.float64, 64, "cpu_kernel") is PerSequenceAttention
    for backend in ("auto", "sdpa"):
        for dtype in (torch.float32, torch.bfloat16):
            assert select_attention(cpu, dtype, 64, backend) is PerSequenceAttention
    with pytest.raises(ValueError, match="FlashInfer needs CUDA"):
        select_attention(cpu, torch.bfloat16, 128, "flashinfer")
    q, k, v, cu = random_packed([3, 5], 2, 2, 32, torch.float32, "cpu")
    attn = plan_attention(cu, 5, 2, 2, 32, True, torch.float32, "sdpa")
    assert type(attn) is PerSequenceAttention
    torch.testing.assert_close(attn.run(q, k, v).double(), reference(q, k, v, cu, True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [CpuKernelAttention, FlashInferAttention, PaddedSdpaAttention,
                                     PerSequenceAttention], ids=lambda cls: cls.__name__)
def test_every_backend_has_the_same_two_methods(backend):
    """Static facts in __init__, per-batch work in plan, per-layer work in run, and nothing else: a model
    holds any backend the same way."""
    methods = {name for name, value in vars(backend).items() if inspect.isfunction(value)}
    assert methods == {"__init__", "plan", "run"}
    assert list(inspect.signature(backend.__init__).parameters) == [
        "self", "num_heads", "num_kv_heads", "head_dim", "causal", "dtype", "scale", "window", "softcap"]
    assert list(inspect.signature(backend.plan).parameters) == ["self", "cu_seqlens", "max_seqlen", "rel_bias"]
    assert list(inspect.signature(backend.run).parameters) == ["self", "q", "k", "v"]


gpu = pytest.mark.skipif(not torch.cuda.is_available() or not flashinfer_available(),
                         reason="needs a CUDA GPU with flashinfer installed")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (16, 16, 64), (28, 4, 128), (8, 1, 256)])
def test_flashinfer_matches_sdpa(causal, heads, kv_heads, head_dim):
    lens = [1, 17, 128, 300, 1000, 63]
    for seed in range(2):
        q, k, v, cu = random_packed(lens, heads, kv_heads, head_dim, torch.bfloat16, "cuda", seed)
        fi = plan_attention(cu, max(lens), heads, kv_heads, head_dim, causal, torch.bfloat16, "flashinfer")
        assert isinstance(fi, FlashInferAttention)
        sdpa = plan_attention(cu, max(lens), heads, kv_heads, head_dim, causal, torch.bfloat16, "sdpa")
        assert isinstance(sdpa, PaddedSdpaAttention)
        out_fi = fi.run(q, k, v).float()
        out_sdpa = sdpa.run(q, k, v).float()
        assert torch.isfinite(out_fi).all()
        rel = (out_fi - out_sdpa).norm() / out_sdpa.norm()
        assert rel < 1e-2, f"relative error {rel:.2e}"
        ref = reference(q, k, v, cu, causal).float().cuda()
        assert (out_fi - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kw", [dict(window=255), dict(softcap=50.0), dict(window=63, softcap=30.0, scale=0.0625)],
                         ids=["window", "softcap", "window-softcap-scale"])
def test_flashinfer_modifiers_match_sdpa(kw):
    """Gemma 2's attention on CUDA: FlashInfer's causal window_left and soft-cap, bf16, against padded SDPA
    (which soft-caps explicitly) and the float64 reference."""
    lens = [1, 17, 300, 1000, 63]
    q, k, v, cu = random_packed(lens, 16, 8, 256, torch.bfloat16, "cuda", seed=2)
    q = q * 4  # scores large enough that the cap bends them
    fi = plan_attention(cu, max(lens), 16, 8, 256, True, torch.bfloat16, "flashinfer", **kw)
    sdpa = plan_attention(cu, max(lens), 16, 8, 256, True, torch.bfloat16, "sdpa", **kw)
    assert isinstance(fi, FlashInferAttention) and isinstance(sdpa, PaddedSdpaAttention)
    out_fi, out_sdpa = fi.run(q, k, v).float(), sdpa.run(q, k, v).float()
    assert torch.isfinite(out_fi).all()
    assert (out_fi - out_sdpa).norm() / out_sdpa.norm() < 1e-2
    ref = reference(q, k, v, cu, True, **kw).float().cuda()
    assert (out_fi - ref).norm() / ref.norm() < 1e-2
