"""sentence-transformers' modules after pooling: `Dense` layers (a linear map and its activation, e.g. a
projection to fewer dimensions), read from modules.json as the Pooling module is. They run on a group's rank 0
on the pooled float32 rows, in modules.json's order, before Matryoshka truncation and normalization."""

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tp_embed.errors import ConfigError

# the activation class sentence-transformers saves by its import path -> the function
ACTIVATIONS = {"Identity": lambda x: x, "Tanh": torch.tanh, "ReLU": F.relu, "GELU": F.gelu, "Sigmoid": torch.sigmoid,
               "SiLU": F.silu}


class Dense:
    """One sentence_transformers.models.Dense: activation(x W^T + b), float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str):
        self.weight, self.bias, self.activation = weight.float(), None if bias is None else bias.float(), activation

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def to(self, device: torch.device) -> "Dense":
        return Dense(self.weight.to(device), None if self.bias is None else self.bias.to(device), self.activation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](F.linear(x.float(), self.weight, self.bias))

    @staticmethod
    def load(module_dir: str) -> "Dense":
        """From a Dense module's folder: config.json and model.safetensors (or an older pytorch_model.bin)."""
        with open(os.path.join(module_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        name = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
        if name not in ACTIVATIONS:
            raise ConfigError(f"{module_dir}: the Dense module's activation {cfg['activation_function']} is not "
                              f"one tp-embed applies ({', '.join(ACTIVATIONS)})")
        weights_file = os.path.join(module_dir, "model.safetensors")
        if os.path.isfile(weights_file):
            state = load_file(weights_file)
        elif os.path.isfile(os.path.join(module_dir, "pytorch_model.bin")):
            state = torch.load(os.path.join(module_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"{module_dir}: the Dense module has no model.safetensors or pytorch_model.bin")
        weight, bias = state["linear.weight"], state.get("linear.bias")
        expected = (cfg.get("out_features", weight.shape[0]), cfg.get("in_features", weight.shape[1]))
        if tuple(weight.shape) != tuple(expected):
            raise ConfigError(f"{module_dir}: Dense weight {tuple(weight.shape)} does not match its config {expected}")
        return Dense(weight, bias, name)


class DenseStack:
    """The Dense modules of a model directory, applied in order."""

    def __init__(self, layers: list[Dense]):
        self.layers = layers

    @staticmethod
    def load(model_dir: str, paths: tuple[str, ...], in_features: int, device: torch.device) -> "DenseStack | None":
        """None without Dense modules; a ConfigError when the first does not take the pooled size."""
        if not paths:
            return None
        layers = [Dense.load(os.path.join(model_dir, p)).to(device) for p in paths]
        size = in_features
        for path, layer in zip(paths, layers):
            if layer.weight.shape[1] != size:
                raise ConfigError(f"{model_dir}/{path}: the Dense module takes {layer.weight.shape[1]} features, "
                                  f"but what comes before it gives {size}")
            size = layer.out_features
        return DenseStack(layers)

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
