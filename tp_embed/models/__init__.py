"""Model families: architecture name -> the family's spec, a plain dict.

A family is one module here ending in `SPEC = ModelSpec(...)` (tp_embed/models/spec.py). To add one, write
the module and add its SPEC to `SPECS`.
"""

import os

import torch
from torch import nn

from tp_embed.config import EngineConfig, ModelConfig, read_hf_config, read_splade_pooling
from tp_embed.errors import ConfigError
from tp_embed.models import bert, clip, decoder, gemma, modernbert, mpnet, qwen2_vl, splade
from tp_embed.models.spec import FAMILY_FLAGS, ModelSpec

SPECS = (decoder.SPEC, bert.SPEC, qwen2_vl.SPEC, clip.SPEC, decoder.CLASSIFIER_SPEC, bert.BERT_CLASSIFIER_SPEC,
         bert.XLMR_CLASSIFIER_SPEC, mpnet.SPEC, modernbert.SPEC, gemma.GEMMA2_SPEC, gemma.GEMMA3_SPEC)
ARCHITECTURES = {arch: spec for spec in SPECS for arch in spec.architectures}
# SPLADE checkpoints share their architectures with dense encoders (BertForMaskedLM): a SpladePooling module
# in modules.json, not the architecture, picks these
SPARSE_ARCHITECTURES = {arch: splade.SPEC for arch in splade.SPEC.architectures}


def load_config(model_path: str, tp_size: int = 1, trust_remote_code: bool = False, overrides: dict | None = None,
                name: str | None = None) -> tuple[ModelSpec, ModelConfig]:
    """The spec of the model in `model_path` (by config.json's architectures, among the SPLADE ones where
    modules.json has a SpladePooling module) and its ModelConfig at this tp. Raises ConfigError for an
    unsupported architecture or a tp that does not fit."""
    name = name or os.path.basename(os.path.normpath(model_path))
    hf, raw = read_hf_config(model_path, trust_remote_code, overrides)
    archs = list(getattr(hf, "architectures", None) or raw.get("architectures") or [])
    sparse = read_splade_pooling(model_path) is not None
    table = SPARSE_ARCHITECTURES if sparse else ARCHITECTURES
    arch = next((a for a in archs if a in table), None)
    if arch is None:
        what = ("a SPLADE model (modules.json has a SpladePooling module) of architecture" if sparse
                else "unsupported architecture")
        raise ConfigError(f"{name}: {what} {archs or '(none in config.json)'}; supported: {', '.join(table)}")
    spec = table[arch]
    return spec, spec.build_config(hf, raw, tp_size, name, model_path)


def check_family_flags(spec: ModelSpec, options: EngineConfig, model_name: str) -> None:
    """ConfigError for a family-specific flag (FAMILY_FLAGS) given to a family that does not take it."""
    for flag, advice in FAMILY_FLAGS.items():
        value = getattr(options, flag)
        if value is None or flag in spec.flags:
            continue
        takers = [s.name for s in SPECS if flag in s.flags]
        note = spec.flag_notes.get(flag) or f"it applies to {', '.join(takers)} models; {advice}"
        raise ConfigError(f"--{flag.replace('_', '-')} {value} does not apply to {model_name}: {note}")


def build_model(spec: ModelSpec, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The family's model at this rank's shard shapes, built directly in `dtype` on `device`."""
    with torch_default(dtype, device):
        model = spec.model_class(config)
    return model.eval()


class torch_default:
    """Build parameters directly at their shard shape, dtype and device (no float32 CPU detour)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device

    def __enter__(self):
        self.old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        self.device_ctx = torch.device(self.device)
        self.device_ctx.__enter__()

    def __exit__(self, *exc):
        self.device_ctx.__exit__(*exc)
        torch.set_default_dtype(self.old_dtype)
