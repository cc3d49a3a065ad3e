"""Weight loading from safetensors: each rank reads only its own slices.

`safe_open(...).get_slice(name)` gives a lazy view of a checkpoint tensor; each parameter's
`weight_loader` indexes it with its own rows or columns, so a rank reads its shard from disk and never
builds the whole tensor.
"""

import json
import os
from collections import defaultdict

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from tp_embed.errors import ConfigError
from tp_embed.layers.fp8_checkpoint import FP8_DTYPE_NAME, SCALE_SUFFIX, DequantizedSlice, is_scale_key, scale_key
from tp_embed.models.spec import CheckpointLayout


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise ConfigError(f"{model_dir}: model.safetensors.index.json lists missing files {missing}")
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not found:
        raise ConfigError(f"{model_dir} holds no .safetensors weights (pytorch_model.bin is not supported; "
                          f"convert it with safetensors' convert script)")
    return [os.path.join(model_dir, f) for f in found]


class _CountingSlice:
    """A safetensors slice that counts the bytes of every read and the largest fraction of each
    checkpoint tensor read at once (tests assert that sharded tensors are never read whole)."""

    def __init__(self, inner, stats: dict, name: str):
        self.inner, self.stats, self.name = inner, stats, name

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        t = self.inner[index]
        self.stats["bytes_read"] += t.numel() * t.element_size()
        full = 1
        for n in self.inner.get_shape():
            full *= n
        self.stats["largest_read_fraction"][self.name] = max(
            self.stats["largest_read_fraction"].get(self.name, 0.0), t.numel() / full)
        return t


def load_weights(model: nn.Module, layout: CheckpointLayout, model_dir: str, show_progress: bool = True,
                 fp8_format: str | None = None) -> dict:
    """Fill every parameter of `model` from the checkpoint in `model_dir`, its keys mapped by the family's
    `layout`; returns read statistics {"bytes_read": n, "largest_read_fraction": {param name: fraction}}.
    `fp8_format` (layers/fp8_checkpoint.py): the checkpoint's FP8 weights are read dequantized."""
    params = dict(model.named_parameters())
    expected = expected_shards(params, layout)
    # a parameter with `tied_to` (a causal LM's head tied to its embedding table) loads from its source's
    # tensor unless the checkpoint has a tensor of its own, which wins whichever comes first; the source may
    # be a tensor no parameter holds (BERT's cls.predictions.bias, its decoder's bias unless that is saved)
    tied = defaultdict(list)
    for name, param in params.items():
        if getattr(param, "tied_to", None):
            tied[param.tied_to].append(name)
    own = set()
    loaded = defaultdict(set)
    stats = {"bytes_read": 0, "largest_read_fraction": {}}
    files = checkpoint_files(model_dir)
    scales = read_fp8_scales(files) if fp8_format else None
    with tqdm(total=len(files), desc="loading weights", unit="file", disable=not show_progress) as bar:
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    target = None if scales is not None and is_scale_key(key) else layout.param_name(key)
                    if target is None:
                        continue
                    name, shard_id = target
                    if name not in params and name not in tied:
                        if name.endswith(("rotary_emb.inv_freq", "position_ids")):
                            continue  # buffers some checkpoints carry
                        raise ConfigError(f"{model_dir}: checkpoint tensor {key!r} matches no parameter "
                                          f"of {type(model).__name__} (mapped to {name!r})")
                    if name in params:
                        param, view = params[name], tensor_view(f, key, stats, name, scales)
                        if shard_id is None:
                            param.weight_loader(param, view)
                        else:
                            param.weight_loader(param, view, shard_id)
                        loaded[name].add(shard_id)
                        own.add(name)
                    for other in tied.get(name, ()):
                        if other not in own:
                            params[other].weight_loader(params[other], tensor_view(f, key, stats, other, scales))
                            loaded[other].add(None)
            bar.update(1)
    missing = [name + ("" if shards == {None} else f" (shards {sorted(map(str, shards - loaded[name]))})")
               for name, shards in expected.items() if shards - loaded[name]]
    if missing:
        raise ConfigError(f"{model_dir}: the checkpoint lacks weights the model needs: {', '.join(missing[:8])}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return stats


def expected_shards(params: dict, layout: CheckpointLayout) -> dict:
    """parameter name -> the shard ids it must be loaded with ({None} for a tensor loaded whole)."""
    expected = defaultdict(set)
    for name in params:
        expected[name].add(None)
    for param_part, shard_id in layout.packed_modules.values():
        if shard_id is not None:
            for name in params:
                if f".{param_part}." in f".{name}":
                    expected[name] = expected[name] - {None} | {shard_id}
    return expected


def read_fp8_scales(files: list[str]) -> dict:
    """Every FP8 weight scale of the checkpoint, by key (one float per output channel or per tensor: small)."""
    scales = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            scales.update((key, f.get_tensor(key)) for key in f.keys() if key.endswith(SCALE_SUFFIX))
    return scales


def tensor_view(f, key: str, stats: dict, name: str, scales: dict | None):
    """A counting slice of checkpoint tensor `key`; an FP8 weight's reads dequantized by its scale."""
    inner = f.get_slice(key)
    view = _CountingSlice(inner, stats, name)
    if scales is None or inner.get_dtype() != FP8_DTYPE_NAME:
        return view
    if scale_key(key) not in scales:
        raise ConfigError(f"checkpoint tensor {key!r} is FP8 but the checkpoint has no {scale_key(key)!r}")
    return DequantizedSlice(view, scales[scale_key(key)])


def init_dummy_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> dict:
    """Random weights of the right shapes (norm weights 1, biases 0) for benchmarks without a checkpoint."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.data.zero_()
        elif param.ndim == 1:
            param.data.fill_(1.0)
        else:
            param.data.copy_(torch.randn(param.shape, generator=gen) * std)
    return {"bytes_read": 0, "largest_read_fraction": {}}
