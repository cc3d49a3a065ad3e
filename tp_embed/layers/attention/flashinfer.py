"""FlashInfer's ragged prefill (BatchPrefillWithRaggedKVCacheWrapper) on CUDA: fp16/bf16 and the head dims
it was built for. `plan` hands the batch's boundaries to the kernel once per batch; `run` is one call."""

import torch

FLASHINFER_HEAD_DIMS = (64, 128, 256)
_WORKSPACES: dict = {}  # one 128 MiB workspace per device, shared by every batch's wrapper


def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


class FlashInferAttention:
    """softmax(q k^T * scale + mask) v per sequence, in FlashInfer's ragged prefill kernel."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool, dtype: torch.dtype,
                 scale: float | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal = causal
        self.dtype = dtype
        self.scale = scale if scale is not None else head_dim ** -0.5

    def plan(self, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
        import flashinfer
        device = cu_seqlens.device
        if device not in _WORKSPACES:
            _WORKSPACES[device] = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_WORKSPACES[device], "NHD")
        indptr = cu_seqlens.to(torch.int32)
        self.wrapper.plan(indptr, indptr, self.num_heads, self.num_kv_heads, self.head_dim, causal=self.causal,
                          sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, heads, head_dim], k/v [num_tokens, kv_heads, head_dim] -> [num_tokens, heads, head_dim]."""
        return self.wrapper.run(q, k, v)
