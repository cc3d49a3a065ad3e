"""Packed-batch attention: the SDPA path against a per-sequence reference, and FlashInfer against SDPA
on a GPU (bf16, causal and bidirectional, GQA, several head dims)."""

import math

import pytest
import torch

from tp_embed.layers import attention
from tp_embed.layers.attention import VarlenAttention, flashinfer_available


def random_packed(lens, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, num_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


def reference(q, k, v, cu, causal):
    """Plain softmax attention, one sequence at a time, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        qs = q[s:e].double().cpu().transpose(0, 1)  # [heads, L, head_dim]
        ks = k[s:e].double().cpu().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[s:e].double().cpu().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (8, 2, 16), (4, 1, 64)])
@pytest.mark.parametrize("lens", [[5], [1, 7, 3, 12], [9, 9]])
@pytest.mark.parametrize("per_sequence", [True, False], ids=["per-sequence", "padded"])
def test_sdpa_matches_reference(causal, heads, kv_heads, head_dim, lens, per_sequence):
    q, k, v, cu = random_packed(lens, heads, kv_heads, head_dim, torch.float32, "cpu")
    attn = VarlenAttention(cu, max(lens), heads, kv_heads, head_dim, causal, torch.float32, backend="sdpa",
                           per_sequence=per_sequence)
    out = attn(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_short_and_long_sequences_on_the_cpu(causal, monkeypatch):
    """Per sequence on the CPU, short float32 sequences take two matmuls and long ones SDPA: both paths,
    side by side in one batch, match the reference, and SDPA alone gives the same."""
    lens = [40, 300, 3]  # x 32 head dims: 1280 and 96 elements are short, 9600 is long
    assert 40 * 32 <= attention.SHORT_SEQUENCE_ELEMENTS < 300 * 32
    q, k, v, cu = random_packed(lens, 4, 4, 32, torch.float32, "cpu", seed=3)
    attn = VarlenAttention(cu, max(lens), 4, 4, 32, causal, torch.float32, backend="sdpa", per_sequence=True)
    out = attn(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, causal), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(attention, "SHORT_SEQUENCE_ELEMENTS", 0)  # SDPA for every sequence
    torch.testing.assert_close(attn(q, k, v), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_sequence", [True, False], ids=["per-sequence", "padded"])
def test_sequences_do_not_see_each_other(per_sequence):
    q, k, v, cu = random_packed([4, 6], 2, 2, 16, torch.float32, "cpu")
    alone = VarlenAttention(cu[:2], 4, 2, 2, 16, False, torch.float32, "sdpa",
                            per_sequence=per_sequence)(q[:4], k[:4], v[:4])
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 10.0  # changing the second sequence must not move the first one's output
    v2[4:] -= 3.0
    packed = VarlenAttention(cu, 6, 2, 2, 16, False, torch.float32, "sdpa", per_sequence=per_sequence)(q, k2, v2)
    torch.testing.assert_close(packed[:4], alone, atol=1e-6, rtol=1e-6)


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
        fi = VarlenAttention(cu, max(lens), heads, kv_heads, head_dim, causal, torch.bfloat16, "flashinfer")
        assert fi.flashinfer
        sdpa = VarlenAttention(cu, max(lens), heads, kv_heads, head_dim, causal, torch.bfloat16, "sdpa")
        out_fi = fi(q, k, v).float()
        out_sdpa = sdpa(q, k, v).float()
        assert torch.isfinite(out_fi).all()
        rel = (out_fi - out_sdpa).norm() / out_sdpa.norm()
        assert rel < 1e-2, f"relative error {rel:.2e}"
        ref = reference(q, k, v, cu, causal).float().cuda()
        assert (out_fi - ref).norm() / ref.norm() < 1e-2
