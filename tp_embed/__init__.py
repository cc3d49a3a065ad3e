"""tp-embed: a tensor-parallel embedding server on torch.distributed."""

__version__ = "0.1.0"
