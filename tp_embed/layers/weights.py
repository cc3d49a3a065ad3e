"""Weight-loader helpers: read a rank's rows or columns from a checkpoint tensor.

`loaded` is a torch tensor or a safetensors slice (`safe_open(...).get_slice`): both index with
`loaded[a:b]` / `loaded[:, a:b]`, so a rank reads only its own part and never the whole tensor.
"""

import torch
from torch import nn


def loaded_shape(loaded) -> tuple[int, ...]:
    return tuple(loaded.get_shape()) if hasattr(loaded, "get_shape") else tuple(loaded.shape)


def read_rows(loaded, start: int, length: int) -> torch.Tensor:
    """Rows [start, start + length) of a tensor or safetensors slice (dim 0)."""
    return loaded[start:start + length]


def read_cols(loaded, start: int, length: int) -> torch.Tensor:
    """Columns [start, start + length) along dim 1 (the input dim of a 2-D weight)."""
    return loaded[:, start:start + length]


def read_all(loaded) -> torch.Tensor:
    return loaded[:]


def replicated_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    shape = loaded_shape(loaded)
    if shape != tuple(param.shape):
        raise ValueError(f"checkpoint shape {shape} does not match parameter shape {tuple(param.shape)}")
    param.data.copy_(read_all(loaded))
