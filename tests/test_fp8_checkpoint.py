"""Checkpoints already in FP8 (tp_embed/layers/fp8_checkpoint.py): a tiny Mistral saved as llm-compressor saves
FP8_DYNAMIC (compressed-tensors) and as fbgemm_fp8 (tests/tiny_fp8.py) loads directly at tp = 1, 2 and 4 and
gives the vectors the unquantized checkpoint gives with --quantization fp8 (the same FP8 values and scales), on
the CPU's quantize-dequantize reference; plus the format checks and the dequantizing slice."""

import numpy as np
import pytest
import torch

from dist_utils import load_output
from family_jobs import TPS
from tiny_fp8 import compressed_tensors_config
from tp_embed.errors import ConfigError
from tp_embed.layers.fp8 import quantize_rows
from tp_embed.layers.fp8_checkpoint import DequantizedSlice, checkpoint_fp8


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", ["mistral_ct", "mistral_fbgemm"])
def test_an_fp8_checkpoint_serves_what_quantizing_serves(family_jobs, tp, name):
    quantized = load_output(family_jobs.dirs, tp, "mistral_fp8")
    got = load_output(family_jobs.dirs, tp, name)
    assert np.abs(got - quantized).max() < 1e-5
    full = load_output(family_jobs.dirs, tp, "mistral")
    cos = (got * full).sum(1)  # normalized vectors
    # FP8, not the float weights, and near them (a random 64-wide model rounds coarsely: 0.92 here)
    assert cos.min() > 0.9 and np.abs(got - full).max() > 1e-4


def test_the_fp8_checkpoint_holds_fp8(family_jobs):
    import glob

    from safetensors import safe_open

    path = glob.glob(f"{family_jobs.checkpoints['mistral_ct']}/*.safetensors")[0]
    with safe_open(path, "pt") as f:
        key = next(k for k in f.keys() if k.endswith("q_proj.weight"))
        assert f.get_slice(key).get_dtype() == "F8_E4M3"
        assert f.get_tensor(key[:-len("weight")] + "weight_scale").shape[1] == 1


def test_formats():
    assert checkpoint_fp8(None, "m") is None
    assert checkpoint_fp8(compressed_tensors_config(), "m") == "compressed-tensors"
    assert checkpoint_fp8({"quant_method": "fbgemm_fp8"}, "m") == "fbgemm_fp8"
    with pytest.raises(ConfigError, match="quant_method 'awq' is not supported"):
        checkpoint_fp8({"quant_method": "awq"}, "m")
    blocks = compressed_tensors_config()
    blocks["config_groups"]["group_0"]["weights"]["strategy"] = "block"
    with pytest.raises(ConfigError, match="a scale per channel or per tensor"):
        checkpoint_fp8(blocks, "m")
    int8 = compressed_tensors_config()
    int8["config_groups"]["group_0"]["weights"].update(type="int")
    with pytest.raises(ConfigError, match="8-bit float weights"):
        checkpoint_fp8(int8, "m")


class Sliceable:
    """A tensor behind the safetensors slice interface."""

    def __init__(self, t):
        self.t = t

    def get_shape(self):
        return list(self.t.shape)

    def __getitem__(self, index):
        return self.t[index]


@pytest.mark.parametrize("per_tensor", [False, True])
def test_dequantized_slice_reads_rows_and_columns(per_tensor):
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    q, scale = quantize_rows(w, w.abs().max().expand(48, 1) if per_tensor else None)
    if per_tensor:
        scale = scale[:1].reshape(1)  # one scale for the tensor, as a per-tensor checkpoint saves it
    full = q.float() * scale
    view = DequantizedSlice(Sliceable(q), scale)
    assert view.get_shape() == [48, 32]
    assert torch.equal(view[8:24], full[8:24])
    assert torch.equal(view[:, 16:32], full[:, 16:32])
    assert (full - w).abs().max() <= w.abs().max() / 16  # it is the FP8 rounding of w
