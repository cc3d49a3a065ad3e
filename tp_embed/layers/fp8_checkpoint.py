"""Checkpoints already in FP8, in the two formats vLLM reads for per-channel FP8 (#22): compressed-tensors'
"float-quantized" (llm-compressor's FP8 and FP8_DYNAMIC schemes: float8_e4m3fn weights with a `weight_scale`
per output channel or per tensor, activations dynamic per token) and fbgemm_fp8 (per-channel `weight_scale`).

The loader reads such a weight as what it stands for, its FP8 values times their scales in float32
(`DequantizedSlice`, each rank its own rows or columns), and the engine then quantizes the layers as
`--quantization fp8` does: per output channel at max |w| / 448, which gives back the checkpoint's own FP8
values where its scales are that absmax (llm-compressor's), so the served model is the checkpoint's. On a GPU
without FP8 matmuls the dequantized weights are served in the model's dtype instead. Static activation scales
(`input_scale`) are read past: activations are quantized per token, dynamically.
"""

from tp_embed.errors import ConfigError

FP8_DTYPE_NAME = "F8_E4M3"  # safetensors' name for float8_e4m3fn
SCALE_SUFFIX = "weight_scale"
SKIPPED_SUFFIXES = ("input_scale", "input_scale_ub", "weight_zero_point")  # not needed for dynamic activations


def quantization_config(hf) -> dict | None:
    """A transformers config's quantization_config as a dict (transformers may have made it an object)."""
    qc = getattr(hf, "quantization_config", None)
    return qc.to_dict() if hasattr(qc, "to_dict") else qc


def checkpoint_fp8(quantization_config: dict | None, name: str) -> str | None:
    """The FP8 format of config.json's quantization_config ("compressed-tensors" or "fbgemm_fp8"), None for an
    unquantized checkpoint; ConfigError for a quantization tp-embed does not read."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "fbgemm_fp8":
        return method
    if method != "compressed-tensors":
        raise ConfigError(f"{name}: quantization_config's quant_method {method!r} is not supported; tp-embed reads "
                          f"FP8 checkpoints in the compressed-tensors (float-quantized) and fbgemm_fp8 formats, or "
                          f"quantizes an unquantized one with --quantization fp8")
    for group_name, group in (quantization_config.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if (weights.get("num_bits"), weights.get("type"), weights.get("strategy")) not in (
                (8, "float", "channel"), (8, "float", "tensor")):
            raise ConfigError(f"{name}: compressed-tensors group {group_name!r} quantizes weights as {weights}; "
                              f"tp-embed reads 8-bit float weights with a scale per channel or per tensor")
    return method


def scale_key(weight_key: str) -> str:
    """The checkpoint key of an FP8 weight's scale: `...q_proj.weight` -> `...q_proj.weight_scale`."""
    return weight_key[:-len("weight")] + SCALE_SUFFIX


def is_scale_key(key: str) -> bool:
    return key.endswith((SCALE_SUFFIX,) + SKIPPED_SUFFIXES)


class DequantizedSlice:
    """A safetensors slice of an FP8 weight [out, in], read as float32 values times `scale` ([out, 1] or [out]
    per channel, or one value per tensor); indexes as the slice does (`[a:b]` rows, `[:, a:b]` columns)."""

    def __init__(self, inner, scale):
        self.inner = inner
        self.scale = scale.float().reshape(-1, 1)

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        values = self.inner[index].float()
        if self.scale.shape[0] == 1:
            return values * self.scale[0]
        rows = index[0] if isinstance(index, tuple) else index
        return values * self.scale[rows]
