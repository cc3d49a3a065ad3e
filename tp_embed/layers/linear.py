"""Tensor-parallel linear layers and the vocab-parallel embedding (Megatron's split).

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that cuts this rank's shard from a
checkpoint tensor. `loaded` is either a torch tensor or a safetensors slice (`safe_open(...).get_slice`):
both index with `loaded[a:b]` / `loaded[:, a:b]`, so a rank reads only its own rows or columns and never
the whole tensor.

With `--cpu-matmul onednn` (the default; CPU, float32), `prepack_linears` packs every linear layer's weight
once into oneDNN's blocked layout, and the layers then multiply with oneDNN with the bias, a GELU and a
residual add done in the same call (1.5x MKL's F.linear on all-MiniLM-L6-v2's matrices at 128 rows on an
AVX-512 CPU, 1.06-1.27x on the whole forward pass). oneDNN compiles and caches a kernel per input shape, so
the rows are padded to one of `bucket_rows`' 72 sizes: memory stays bounded whatever the batch sizes.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tp_embed.distributed import all_reduce, all_reduce_max, tp_rank, tp_size
from tp_embed.errors import ConfigError
from tp_embed.layers.fp8 import SCALED_MM_MULTIPLE, fake_quantize_rows, quantize_rows, scaled_matmul
from tp_embed.layers.weights import loaded_shape, read_cols, read_rows, replicated_weight_loader

# transformers' activation name -> oneDNN's GELU algorithm, for the activations a layer can fuse
FUSABLE_ACTIVATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}


def bucket_rows(num_rows: int) -> int:
    """The row count a packed matmul runs at: multiples of 8 up to 256 rows, then 8 sizes per doubling
    (at most 1/8 padding), 72 sizes up to 8192 rows. oneDNN compiles and keeps a kernel per input shape
    (about 0.5 MB each), so unbucketed batch sizes grew rank 0's memory without bound."""
    if num_rows <= 256:
        return -(-num_rows // 8) * 8
    step = 1 << (num_rows.bit_length() - 4)
    return -(-num_rows // step) * step


def pad_rows(x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x [m, k] with zero rows appended up to num_rows."""
    if x.shape[0] == num_rows:
        return x
    padded = x.new_empty(num_rows, x.shape[1])
    padded[:x.shape[0]] = x
    padded[x.shape[0]:] = 0
    return padded


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """What the tensor-parallel linear layers share: an optional oneDNN-packed copy of the weight.

    After `prepack`, `matmul(x, bias)` runs oneDNN's fp32 matmul on the packed weight, and the plain
    weight's storage is released (the packed copy is the only one kept)."""

    packed: torch.Tensor | None = None
    fp8_weight: torch.Tensor | None = None  # CUDA FP8: the weight transposed, [in, out] column-major
    fp8_scale: torch.Tensor | None = None  # its scales [1, out]
    fp8_reference: bool = False  # CPU FP8: the weight holds its dequantized FP8 values; inputs round through FP8

    def quantize_fp8(self) -> None:
        """--quantization fp8 (tp_embed/layers/fp8.py): one scale per output channel, the channel's max |w| over
        its whole row (`row_absmax`: a row-parallel layer's ranks agree on it), so every tp quantizes alike and
        an FP8 checkpoint's own values come back. CUDA keeps the FP8 weight for torch._scaled_mm and releases
        the original; the CPU keeps the dequantized weight (which `prepack` may then pack)."""
        w = self.weight.detach()
        absmax = self.row_absmax(w)
        if w.device.type == "cpu":
            self.weight.data = fake_quantize_rows(w, absmax)
            self.fp8_reference = True
            return
        if w.shape[0] % SCALED_MM_MULTIPLE or w.shape[1] % SCALED_MM_MULTIPLE:
            raise ConfigError(f"--quantization fp8: a {w.shape[0]} x {w.shape[1]} weight shard; FP8 matmuls need "
                              f"both sizes a multiple of {SCALED_MM_MULTIPLE}")
        q, scale = quantize_rows(w, absmax)
        self.fp8_weight, self.fp8_scale = q.t(), scale.t().contiguous()
        self.weight.data = w.new_empty(0)

    def row_absmax(self, w: torch.Tensor) -> torch.Tensor:
        """Each output row's max |w|, [out, 1]: this shard's (a column-parallel rank holds whole rows)."""
        return w.abs().amax(dim=1, keepdim=True)

    def prepack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self.weight.data = self.weight.data.new_empty(0)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + bias, then the activation (a FUSABLE_ACTIVATIONS name), then + residual."""
        if self.fp8_reference:
            x = fake_quantize_rows(x)
        if self.packed is not None:
            lead, num_rows = x.shape[:-1], x[..., 0].numel()
            rows = bucket_rows(num_rows)
            x = pad_rows(x.reshape(num_rows, -1), rows)  # [rows, in_features]
            if residual is not None and activation is None:
                residual = pad_rows(residual.reshape(num_rows, -1), rows)
                y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, bias, "add")
                return y[:num_rows].view(*lead, -1)
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "gelu" if activation else "none", [],
                                                   FUSABLE_ACTIVATIONS[activation] if activation else "")
            y = y[:num_rows].view(*lead, -1)
        else:
            if self.fp8_weight is not None:
                y = scaled_matmul(x.reshape(-1, x.shape[-1]), self.fp8_weight, self.fp8_scale).view(*x.shape[:-1], -1)
                y = y if bias is None else y + bias
            else:
                y = F.linear(x, self.weight, bias)
            if activation is not None:
                y = F.gelu(y, approximate=FUSABLE_ACTIVATIONS[activation])
        return y if residual is None else y + residual


def quantize_linears(model: nn.Module) -> int:
    """--quantization fp8 on every tensor-parallel linear layer of `model`; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m.quantize_fp8()
    return len(layers)


def prepack_linears(model: nn.Module) -> int:
    """Pack the weight of every tensor-parallel linear layer for oneDNN (CPU, float32); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.weight.dtype == torch.float32
              and m.weight.device.type == "cpu"]
    for m in layers:
        m.prepack()
    return len(layers)


def named_weights(model: nn.Module):
    """(name, tensor) for every parameter of `model`; a packed layer's oneDNN copy stands in for its
    released weight, so sizes add up to what the rank holds."""
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and isinstance(module, PackedLinear) and module.packed is not None:
                param = module.packed
            elif name == "weight" and isinstance(module, PackedLinear) and module.fp8_weight is not None:
                param = module.fp8_weight
            yield (f"{module_name}.{name}" if module_name else name), param


class ColumnParallelLinear(PackedLinear):
    """Y = XA + b. A is split along its output dimension, A = [A_1, ..., A_p]; rank i holds A_i and b_i
    and computes Y_i = X A_i + b_i. No communication: the next layer consumes the split output.
    `activation`, a FUSABLE_ACTIVATIONS name, is applied to Y_i in the same call where oneDNN runs it."""

    def __init__(self, input_size: int, output_size: int, bias: bool, activation: str | None = None):
        super().__init__()
        if activation is not None and activation not in FUSABLE_ACTIVATIONS:
            raise ValueError(f"activation {activation!r} cannot be fused; use one of {list(FUSABLE_ACTIVATIONS)}")
        self.activation = activation
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.input_size = input_size
        self.output_size_per_partition = output_size // self.tp_size
        assert self.output_size_per_partition * self.tp_size == output_size
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        rows = param.shape[0]
        param.data.copy_(read_rows(loaded, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias, self.activation)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (gate and up) stacked in one matmul: each rank holds
    [A_gate_i; A_up_i], shard_id names which checkpoint tensor is being loaded."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int = 0) -> None:
        local = [s // self.tp_size for s in self.output_sizes]
        offset = sum(local[:shard_id])
        param.data[offset:offset + local[shard_id]].copy_(
            read_rows(loaded, self.tp_rank * local[shard_id], local[shard_id]))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by attention heads.

    Rank i holds q heads [i*h/p, (i+1)*h/p) and its KV heads: a slice of them when p divides
    num_kv_heads, or one KV head replicated over p/num_kv_heads ranks when p exceeds it (GQA with tp >
    kv heads). Output layout per rank: [q_local | k_local | v_local].
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        tp = tp_size()
        self.head_dim = head_dim
        self.num_local_heads = num_heads // tp
        self.num_local_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)  # ranks sharing one KV head
        output = (self.num_local_heads + 2 * self.num_local_kv_heads) * head_dim * tp
        super().__init__(hidden_size, output, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str = "q") -> None:
        q_size = self.num_local_heads * self.head_dim
        kv_size = self.num_local_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp_rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (self.tp_rank // self.kv_replicas) * kv_size
        param.data[offset:offset + size].copy_(read_rows(loaded, start, size))


class StackedColumnParallelLinear(ColumnParallelLinear):
    """[Y_1 | ... | Y_n] = X [A_1; ...; A_n]^T + b, loaded from ONE checkpoint tensor that stacks the n parts
    by rows (Qwen2-VL's vision `attn.qkv` and ModernBERT's `Wqkv`: q, k, v; ModernBERT's `Wi`: input, gate).
    Each part is split along its output dimension (for q, k, v: by heads); rank i holds shard i of every part,
    laid out [A_1_i; ...; A_n_i]."""

    def __init__(self, input_size: int, part_size: int, num_parts: int, bias: bool):
        self.num_parts = num_parts
        super().__init__(input_size, num_parts * part_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        local, full = param.shape[0] // self.num_parts, loaded_shape(loaded)[0] // self.num_parts
        for i in range(self.num_parts):
            param.data[i * local:(i + 1) * local].copy_(read_rows(loaded, i * full + self.tp_rank * local, local))


class RowParallelLinear(PackedLinear):
    """Y = XA + b. A is split along its input dimension, A = [A_1; ...; A_p], and X along its last
    dimension; rank i computes X_i A_i and the partial sums are all-reduced. b is added once, after."""

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.input_size_per_partition = input_size // self.tp_size
        assert self.input_size_per_partition * self.tp_size == input_size
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = replicated_weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        cols = param.shape[1]
        param.data.copy_(read_cols(loaded, self.tp_rank * cols, cols))

    def row_absmax(self, w: torch.Tensor) -> torch.Tensor:
        """The whole row's max |w| (each rank holds some of its columns): the largest of the ranks'."""
        return all_reduce_max(w.abs().amax(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """XA + b, plus `residual` when given (one oneDNN call at tp = 1)."""
        if self.tp_size == 1:
            return self.matmul(x, self.bias, residual=residual)
        y = all_reduce(self.matmul(x, None))
        if self.bias is not None:
            y = y + self.bias
        return y if residual is None else y + residual


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows: rank i holds ids [i*V/p, (i+1)*V/p) of the vocabulary padded to a
    multiple of p. Ids outside the shard look up zeros; the all-reduce sums the one non-zero row."""

    def __init__(self, num_embeddings_padded: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.rows_per_partition = num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.rows_per_partition
        self.weight = nn.Parameter(torch.empty(self.rows_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        load_vocab_rows(param, loaded, self.vocab_start)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_partition)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce(out)


def load_vocab_rows(param: nn.Parameter, loaded, vocab_start: int) -> None:
    """This rank's rows [vocab_start, vocab_start + len(param)) of a vocabulary-sized checkpoint tensor; rows
    past the real vocabulary (the padding to a multiple of tp) are zero."""
    rows = max(0, min(param.shape[0], loaded_shape(loaded)[0] - vocab_start))
    param.data.zero_()
    if rows:
        param.data[:rows].copy_(read_rows(loaded, vocab_start, rows))


class ParallelLMHead(ColumnParallelLinear):
    """Logits Y = X E^T + b over the vocabulary padded to a multiple of p, split by rows as
    VocabParallelEmbedding splits it: rank i holds rows [i*V/p, (i+1)*V/p) of E (its own, or the embedding
    table it is tied to) and of b, and computes those columns of Y; padded rows are zero. No communication:
    the caller reduces its columns and gathers them."""

    def __init__(self, input_size: int, num_embeddings_padded: int, bias: bool):
        super().__init__(input_size, num_embeddings_padded, bias)
        self.vocab_start = self.tp_rank * self.output_size_per_partition

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        load_vocab_rows(param, loaded, self.vocab_start)

    def quantize_fp8(self) -> None:
        """--quantization fp8 leaves the vocabulary in the model's dtype, as vLLM leaves lm_head (the padded
        vocabulary is seldom a multiple of the FP8 matmul's 16)."""
