"""The fused elementwise ops (tp_embed/layers/fused.py): the PyTorch reference against transformers' own layers on
the CPU (what every CPU test of the decoder families then runs), and FlashInfer's kernels against the reference
on a CUDA GPU (GPU-marked: skipped here, run by benchmarks/gpu_check.py), one op at a time and a whole tiny
decoder with --fused-ops auto against off."""

import pytest
import torch
from transformers.activations import ACT2FN

from tp_embed.layers import fused
from tp_embed.layers.norm import GemmaRMSNorm, RMSNorm
from tp_embed.layers.rotary import RotaryEmbedding, apply_rotary, rope_cos_sin

ACTIVATIONS = tuple(fused.ACTIVATION_KERNELS)


def cuda_with_flashinfer() -> bool:
    return torch.cuda.is_available() and fused._flashinfer() is not None


gpu = pytest.mark.skipif(not cuda_with_flashinfer(), reason="needs a CUDA GPU with flashinfer installed")


@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_reference_is_transformers(gemma):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as HFGemma
    from transformers.models.llama.modeling_llama import LlamaRMSNorm as HFLlama

    torch.manual_seed(0)
    x, weight = torch.randn(7, 64, dtype=torch.bfloat16) * 3, torch.randn(64) * 0.1 + (0 if gemma else 1)
    hf = HFGemma(64, eps=1e-6) if gemma else HFLlama(64, eps=1e-6)
    hf.weight.data.copy_(weight)
    hf = hf.to(torch.bfloat16) if not gemma else hf
    ours = (GemmaRMSNorm if gemma else RMSNorm)(64, 1e-6)
    ours.weight.data.copy_(weight.to(ours.weight.dtype) if gemma else weight.to(torch.bfloat16))
    ours = ours if gemma else ours.to(torch.bfloat16)
    assert torch.equal(ours(x), hf(x))


@pytest.mark.parametrize("gemma", [False, True])
def test_add_rms_norm_reference(gemma):
    torch.manual_seed(1)
    x, residual, weight = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    normed, total = fused.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5, gemma)
    assert torch.equal(total, x + residual)
    assert torch.equal(normed, fused.rms_norm_reference(x + residual, weight, 1e-5, gemma))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation_reference(activation):
    torch.manual_seed(2)
    gate_up = torch.randn(6, 2 * 48)
    expected = ACT2FN[activation](gate_up[:, :48]) * gate_up[:, 48:]
    assert torch.equal(fused.gated_activation(gate_up, activation), expected)


def test_the_cpu_and_float32_never_take_the_kernels():
    assert fused.kernels_for(torch.randn(4, 8)) is None
    assert fused.kernels_for(torch.randn(4, 8, dtype=torch.bfloat16)) is None
    q = torch.randn(4, 2, 64, dtype=torch.bfloat16)
    assert not fused.rope_kernel_takes(q, q, torch.arange(4))


def qkv_views(num_tokens: int, heads: int, kv_heads: int, head_dim: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, heads, D] and k [n, kv_heads, D] as a decoder's attention has them: views of one qkv projection."""
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, **kw)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(num_tokens, heads, head_dim), k.view(num_tokens, kv_heads, head_dim)


def packed_positions(lengths: list[int], device="cpu") -> torch.Tensor:
    return torch.cat([torch.arange(n, dtype=torch.int32, device=device) for n in lengths])


def test_the_rope_table_holds_the_references_angles():
    """The float32 cos | sin table FlashInfer's kernel reads is, row by row, what the PyTorch path computes."""
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    rotary = RotaryEmbedding(inv_freq, scale=1.3, max_positions=300)
    positions = packed_positions([300, 7])
    cos, sin = rope_cos_sin(positions, inv_freq, 1.3, torch.float32)
    table = rotary.table()
    assert table.shape == (300, 64) and table.dtype == torch.float32
    assert torch.equal(table[positions.long(), :32], cos) and torch.equal(table[positions.long(), 32:], sin)


def test_rope_keeps_the_pytorch_path_where_the_kernel_cannot_go():
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    positions = packed_positions([5, 3])
    assert RotaryEmbedding(inv_freq, max_positions=8)(positions, 5, torch.float32).kernel
    assert not RotaryEmbedding(inv_freq, max_positions=4)(positions, 5, torch.float32).kernel  # past the table
    mrope = RotaryEmbedding(inv_freq, section=[8, 12, 12], max_positions=8)
    assert not mrope(positions.expand(3, -1), 5, torch.float32).kernel
    # on the CPU: the rotate-half reference; rows past the batch's tokens (oneDNN's padding) come out zero
    rope = RotaryEmbedding(inv_freq, scale=0.5, max_positions=8)(positions, 5, torch.float32, rows=10)
    q, k = qkv_views(10, 4, 2, 64)
    got_q, got_k = rope.rotate(q, k)
    cos, sin = rope_cos_sin(positions, inv_freq, 0.5, torch.float32)
    assert torch.equal(got_q[:8], apply_rotary(q[:8], cos, sin))
    assert torch.equal(got_k[:8], apply_rotary(k[:8], cos, sin))
    assert (got_q[8:] == 0).all() and (got_k[8:] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gemma", [False, True])
def test_flashinfer_norms_match_the_reference(dtype, gemma):
    torch.manual_seed(3)
    x = torch.randn(300, 4096, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    weight = (torch.randn(4096, device="cuda") * 0.1 + (0 if gemma else 1)).to(dtype)
    expected = fused.rms_norm_reference(x, weight, 1e-6, gemma)
    assert (fused.rms_norm(x, weight, 1e-6, gemma) - expected).abs().max() <= 0.02 * expected.abs().max()
    want_total = x + residual
    want = fused.rms_norm_reference(want_total, weight, 1e-6, gemma)
    normed, total = fused.add_rms_norm(x.clone(), residual.clone(), weight, 1e-6, gemma)
    assert torch.equal(total, want_total)
    assert (normed - want).abs().max() <= 0.02 * want.abs().max()


@gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_flashinfer_gated_activations_match_the_reference(activation):
    torch.manual_seed(4)
    gate_up = torch.randn(257, 2 * 1408, device="cuda", dtype=torch.bfloat16)
    expected = fused.gated_activation_reference(gate_up, activation)
    got = fused.gated_activation(gate_up, activation)
    assert got.shape == expected.shape
    assert (got.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_flashinfer_rope_matches_the_reference(head_dim, dtype):
    """FlashInfer's kernel in place on q/k views of a qkv projection, against the rotation in float32."""
    torch.manual_seed(5)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cuda") / head_dim))
    positions = packed_positions([700, 1, 33, 128], "cuda")
    rope = RotaryEmbedding(inv_freq, scale=1.2, max_positions=1024)(positions, 700, dtype)
    q, k = qkv_views(positions.numel(), 8, 2, head_dim, device="cuda", dtype=dtype)
    assert fused.rope_kernel_takes(q, k, positions)
    cos, sin = rope_cos_sin(positions, inv_freq, 1.2, torch.float32)
    want_q, want_k = apply_rotary(q.float(), cos, sin), apply_rotary(k.float(), cos, sin)
    got_q, got_k = rope.rotate(q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert (got.float() - want).abs().max() <= 0.01 * want.abs().max()


@gpu
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_a_decoder_with_fused_ops_matches_it_without(family, tmp_path, monkeypatch):
    """A tiny random decoder on CUDA in bf16 (head dim 64, so the rotary kernel takes it): every token's last hidden
    state with --fused-ops auto against off."""
    import tiny_gemma as tg
    import tiny_models as tm
    from tp_embed.batch import Batch
    from tp_embed.loader import load_weights
    from tp_embed.models import build_model, load_config

    path = (tm.make_qwen3 if family == "qwen3" else tg.make_embeddinggemma)(str(tmp_path / family), head_dim=64)
    spec, cfg = load_config(path)
    model = build_model(spec, cfg, torch.bfloat16, torch.device("cuda"))
    load_weights(model, spec.checkpoint, path, False)
    batch = Batch.from_token_ids([[5, 6, 7, 8, 9] * 20, [11, 12, 13], list(range(3, 60))], "cuda")
    outputs, rotations = {}, []
    rope_inplace = fused.rope_inplace
    monkeypatch.setattr(fused, "rope_inplace", lambda *a: rotations.append(1) or rope_inplace(*a))
    for enabled in (False, True):
        fused.set_enabled(enabled)
        with torch.inference_mode():
            outputs[enabled] = model(batch, "sdpa").float()
    fused.set_enabled(True)
    assert len(rotations) == len(model.layers)  # the fused run turned q and k in FlashInfer's kernel
    cos = torch.nn.functional.cosine_similarity(outputs[True], outputs[False], dim=-1)
    assert cos.min() > 0.999, cos.min()
