"""Attention over packed, unpadded batches.

Sequences are packed end to end; `cu_seqlens` [B+1] marks their boundaries. `VarlenAttention` is
built once per batch (FlashInfer plans its kernel there) and called once per layer with
q [num_tokens, heads, head_dim], k/v [num_tokens, kv_heads, head_dim].

On CUDA with a head dim FlashInfer supports: FlashInfer's ragged prefill. Other CUDA cases (head dim 32 as
in all-MiniLM-L6-v2): PyTorch SDPA on the batch scattered into a padded [B, heads, L, head_dim] view with
a mask that keeps every sequence to itself. On the CPU with backend "cpu_kernel" (the engine's choice
when `tp_embed.kernels` compiled it; float32, head dim a multiple of 16): the compiled kernel, every
sequence and head in one call, no padding. Other CPU cases: one sequence at a time, with no padding and no
mask (a padded batch computes every sequence at the longest one's length), short float32 sequences as two
batched matmuls and a softmax, longer ones with SDPA. All compute the same function.
"""

import torch
import torch.nn.functional as F

FLASHINFER_HEAD_DIMS = (64, 128, 256)
# CPU float32: a sequence with L x head_dim at most this takes two matmuls and a softmax instead of SDPA
# (at 12 heads of 32: 1.4x faster at L = 117, 1.1x at 256, slower from 384; at 32 heads of 128, causal:
# faster at 64, slower at 256)
SHORT_SEQUENCE_ELEMENTS = 8192
_WORKSPACES: dict = {}


def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


def use_cpu_kernel(device: torch.device, head_dim: int, dtype: torch.dtype, backend: str) -> bool:
    """The compiled CPU kernel takes float32 with head dims in whole vectors of 16."""
    return backend == "cpu_kernel" and device.type == "cpu" and dtype == torch.float32 and head_dim % 16 == 0


def use_flashinfer(device: torch.device, head_dim: int, dtype: torch.dtype, backend: str = "auto") -> bool:
    if backend in ("sdpa", "cpu_kernel"):
        return False
    ok = device.type == "cuda" and head_dim in FLASHINFER_HEAD_DIMS and dtype in (torch.float16, torch.bfloat16)
    if backend == "flashinfer":
        if not ok:
            raise ValueError(f"FlashInfer needs CUDA, fp16/bf16 and head_dim in {FLASHINFER_HEAD_DIMS}")
        if not flashinfer_available():
            raise ValueError("--attention-backend flashinfer: flashinfer is not installed (pip install '.[gpu]')")
        return True
    return ok and flashinfer_available()


class VarlenAttention:
    """softmax(q k^T * scale + mask) v per sequence; mask is causal or none, never across sequences."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, causal: bool, dtype: torch.dtype, backend: str = "auto",
                 scale: float | None = None, per_sequence: bool | None = None):
        """per_sequence: attend one sequence at a time instead of on the padded batch (default: on the CPU)."""
        self.causal = causal
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        device = cu_seqlens.device
        self.cpu_kernel = use_cpu_kernel(device, head_dim, dtype, backend)
        if self.cpu_kernel:
            self.cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
            self.num_tokens = int(self.cu_seqlens[-1])
            self.flashinfer = False
            return
        self.flashinfer = use_flashinfer(device, head_dim, dtype, backend)
        if self.flashinfer:
            import flashinfer
            if device not in _WORKSPACES:
                _WORKSPACES[device] = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
            self.wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_WORKSPACES[device], "NHD")
            indptr = cu_seqlens.to(torch.int32)
            self.wrapper.plan(indptr, indptr, num_heads, num_kv_heads, head_dim, causal=causal,
                              sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype)
            return
        self.per_sequence = device.type == "cpu" if per_sequence is None else per_sequence
        if self.per_sequence:
            self.bounds = cu_seqlens.tolist()
            return
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.num_seqs = lens.numel()
        self.max_seqlen = max_seqlen
        if self.num_seqs == 1:
            return
        # token t of the packed batch sits at (seq_idx[t], pos_idx[t]) of the padded view
        self.seq_idx = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), lens)
        self.pos_idx = torch.arange(self.seq_idx.numel(), device=device) - cu_seqlens[:-1].long()[self.seq_idx]
        ar = torch.arange(max_seqlen, device=device)
        mask = (ar[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, L]: keys inside the sequence
        if causal:
            mask = mask & (ar[None, :] <= ar[:, None])[None, None]  # [B, 1, L, L]
        self.mask = mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """On the CPU q, k and v may carry rows past the batch's tokens (a model that pads its rows once for
        the packed linear layers): those rows come back as zeros."""
        if self.cpu_kernel:
            n, rows = self.num_tokens, q.shape[0]
            q, k, v = (x[:n] if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x[:n].contiguous()
                       for x in (q, k, v))
            out = torch.empty((rows,) + q.shape[1:], dtype=q.dtype)
            if rows > n:
                out[n:] = 0
            torch.ops.tp_embed.varlen_attention(q, k, v, self.cu_seqlens, self.causal, self.scale, out[:n])
            return out
        if self.flashinfer:
            return self.wrapper.run(q, k, v)
        if self.per_sequence:
            bounds = self.bounds
            if len(bounds) == 2 and bounds[1] == q.shape[0]:
                return self._one(q, k, v)
            out = torch.empty_like(q)
            if q.shape[0] > bounds[-1]:
                out[bounds[-1]:] = 0
            for start, end in zip(bounds[:-1], bounds[1:]):
                out[start:end] = self._one(q[start:end], k[start:end], v[start:end])
            return out
        if self.num_seqs == 1:
            return self._one(q, k, v)
        o = F.scaled_dot_product_attention(self._pad(q), self._pad(k), self._pad(v), attn_mask=self.mask,
                                           scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        # o: [B, heads, L, head_dim]
        return o.transpose(1, 2)[self.seq_idx, self.pos_idx]

    def _one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence, no mask beyond the causal one: q [L, heads, head_dim], k/v [L, kv_heads, head_dim]."""
        seq_len, num_heads, head_dim = q.shape
        if (q.device.type == "cpu" and q.dtype == torch.float32 and num_heads == k.shape[1]
                and seq_len * head_dim <= SHORT_SEQUENCE_ELEMENTS):
            # two batched matmuls over the heads beat SDPA's flash kernel on short sequences
            scores = torch.bmm(q.transpose(0, 1), k.permute(1, 2, 0)).mul_(self.scale)  # [heads, L, L]
            if self.causal:
                scores.masked_fill_(torch.ones(seq_len, seq_len, dtype=torch.bool).triu_(1), float("-inf"))
            return torch.bmm(scores.softmax(-1), v.transpose(0, 1)).transpose(0, 1)  # [L, heads, head_dim]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], is_causal=self.causal, scale=self.scale,
                                           enable_gqa=num_heads != k.shape[1])
        return o[0].transpose(0, 1)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(self.num_seqs, self.max_seqlen, x.shape[1], x.shape[2])
        padded[self.seq_idx, self.pos_idx] = x
        return padded.transpose(1, 2)  # [B, heads, L, head_dim]
