"""The fused elementwise ops (tp_embed/layers/fused.py): the PyTorch reference against transformers' own layers on
the CPU (what every CPU test of the decoder families then runs), and FlashInfer's kernels against the reference
on a CUDA GPU (GPU-marked: skipped here, run by benchmarks/gpu_check.py), one op at a time and a whole tiny
decoder with --fused-ops auto against off."""

import pytest
import torch
from transformers.activations import ACT2FN

from tp_embed.layers import fused
from tp_embed.layers.norm import GemmaRMSNorm, RMSNorm

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
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_a_decoder_with_fused_ops_matches_it_without(family, tmp_path):
    """A tiny random decoder on CUDA in bf16: every token's last hidden state with --fused-ops auto against off."""
    import tiny_gemma as tg
    import tiny_models as tm
    from tp_embed.batch import Batch
    from tp_embed.loader import load_weights
    from tp_embed.models import build_model, load_config

    path = (tm.make_qwen3 if family == "qwen3" else tg.make_embeddinggemma)(str(tmp_path / family))
    spec, cfg = load_config(path)
    model = build_model(spec, cfg, torch.bfloat16, torch.device("cuda"))
    load_weights(model, spec.checkpoint, path, False)
    batch = Batch.from_token_ids([[5, 6, 7, 8, 9] * 20, [11, 12, 13], list(range(3, 60))], "cuda")
    outputs = {}
    for enabled in (False, True):
        fused.set_enabled(enabled)
        with torch.inference_mode():
            outputs[enabled] = model(batch, "sdpa").float()
    fused.set_enabled(True)
    cos = torch.nn.functional.cosine_similarity(outputs[True], outputs[False], dim=-1)
    assert cos.min() > 0.999, cos.min()
