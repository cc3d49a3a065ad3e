"""A tiny checkpoint rewritten as an FP8 one, as llm-compressor (compressed-tensors, FP8_DYNAMIC) or fbgemm saves
it: every linear weight of the decoder layers float8_e4m3fn with a float32 `weight_scale` [out, 1] at its
row's max |w| / 448; embeddings, norms and the LM head left as they were."""

import json
import os
import shutil

from safetensors.torch import load_file, save_file

from tp_embed.layers.fp8 import quantize_rows

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def compressed_tensors_config() -> dict:
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True}}}}


def make_fp8_checkpoint(src: str, dst: str, fmt: str = "compressed-tensors") -> str:
    """dst: src's model directory with its layers' linear weights in FP8 (`fmt`: compressed-tensors or
    fbgemm_fp8)."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(dst, name)
        tensors = load_file(path)
        for key in list(tensors):
            if key.endswith(".weight") and any(f".{m}." in key for m in LINEARS):
                q, scale = quantize_rows(tensors[key].float())
                tensors[key], tensors[key[:-len("weight")] + "weight_scale"] = q, scale
        save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"] = (compressed_tensors_config() if fmt == "compressed-tensors" else
                                     {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                      "modules_to_not_convert": ["lm_head"]})
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return dst
