"""FlashInfer's ragged prefill (BatchPrefillWithRaggedKVCacheWrapper) on CUDA: fp16/bf16 and the head dims
it was built for. `plan` hands the batch's boundaries to the kernel once per batch; `run` is one call. In a CUDA
graph (tp_embed/cuda_graphs.py) the wrapper is made once, in FlashInfer's CUDA-graph mode: a fixed number of
sequences, boundaries in fixed buffers, no split-KV; both its schedulers (FA2, and FA3 on Hopper) then size
their work lists from the graph's token and sequence counts alone, so every replan fits the kernels captured.
The backend is FlashInfer's choice, as eagerly, so a graph needs no kernel of its own compiled.
It takes a causal sliding window (`window_left`, Gemma 2) and logit soft-capping; a window on both sides or a
relative position bias goes to padded SDPA instead (`select_attention`)."""

import torch

FLASHINFER_HEAD_DIMS = (64, 128, 256)
_WORKSPACES: dict = {}  # one 128 MiB workspace per device, shared by every batch's wrapper


def workspace(device: torch.device) -> torch.Tensor:
    if device not in _WORKSPACES:
        _WORKSPACES[device] = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
    return _WORKSPACES[device]


def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


class FlashInferAttention:
    """softmax(q k^T * scale + mask) v per sequence, in FlashInfer's ragged prefill kernel."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool, dtype: torch.dtype,
                 scale: float | None = None, window: int | None = None, softcap: float | None = None):
        if window is not None and not causal:
            raise ValueError("FlashInfer's window_left limits the left side only: a window on both sides needs "
                             "another backend")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal = causal
        self.window, self.softcap = window, softcap
        self.dtype = dtype
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.wrapper, self.graph = None, False  # graph: made for a CUDA graph by `for_cuda_graph`

    def plan(self, cu_seqlens: torch.Tensor, max_seqlen: int, rel_bias: torch.Tensor | None = None) -> None:
        import flashinfer

        if rel_bias is not None:
            raise ValueError("FlashInfer takes no additive bias: a relative position bias needs another backend")
        extra = {}
        if self.graph:  # the same kernels for every batch the graph replays
            extra = {"disable_split_kv": True}
        else:
            self.wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(cu_seqlens.device), "NHD")
        indptr = cu_seqlens.to(torch.int32)
        self.wrapper.plan(indptr, indptr, self.num_heads, self.num_kv_heads, self.head_dim, causal=self.causal,
                          window_left=-1 if self.window is None else self.window, logits_soft_cap=self.softcap,
                          sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype, **extra)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, heads, head_dim], k/v [num_tokens, kv_heads, head_dim] -> [num_tokens, heads, head_dim]."""
        return self.wrapper.run(q, k, v)


def for_cuda_graph(attn: FlashInferAttention, slots: int, device: torch.device) -> FlashInferAttention:
    """`attn` with one wrapper for good, in FlashInfer's CUDA-graph mode for `slots` sequences: `plan` then
    writes each batch's boundaries into the wrapper's fixed buffers instead of making a new wrapper."""
    import flashinfer

    buffers = [torch.zeros(slots + 1, dtype=torch.int32, device=device) for _ in range(2)]
    attn.wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
        workspace(device), "NHD", use_cuda_graph=True, qo_indptr_buf=buffers[0], kv_indptr_buf=buffers[1])
    attn.graph = True
    return attn
