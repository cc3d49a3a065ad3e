"""FP8 linear layers (`--quantization fp8`): weights quantized once at load to float8_e4m3fn with one scale
per output channel, activations quantized per token with a dynamic scale (each row's max |x| maps to 448,
e4m3's largest value).

- CUDA on Hopper (compute capability 9.0; torch's row-wise scaled matmul is a Hopper kernel, not built for
  Ada): `torch._scaled_mm` on the FP8 operands with the row-wise scales, bf16 out (the only output type
  row-wise scaling takes), cast to the model's dtype; the bias, a GELU and a residual after it. The all-reduce of a
  row-parallel layer stays in the model's dtype.
- CPU: the reference. The weight is stored dequantized (its FP8 values times its scales, in float32) and
  every input is quantized and dequantized per token before a float32 matmul: the same rounding as the GPU
  path, up to the order of the float32 sums, so the scheme's accuracy is tested without an FP8 GPU.
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale
SCALED_MM_MULTIPLE = 16  # torch._scaled_mm's operands need both matrix dimensions a multiple of 16


def quantize_rows(x: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] -> (float8_e4m3fn [m, k], float32 scales [m, 1]) with x ~ q * scale, one scale per row: each
    row's max |x|, or `absmax` [m, 1] (a whole row's, of which x holds a row-parallel rank's columns), at 448."""
    if absmax is None:
        absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = absmax.float().clamp(min=MIN_SCALE) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fake_quantize_rows(x: torch.Tensor, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """x rounded through FP8 row by row (quantize, dequantize), in x's dtype and shape."""
    rows = x.reshape(-1, x.shape[-1])
    q, scale = quantize_rows(rows, absmax)
    return (q.float() * scale).to(x.dtype).view(x.shape)


def fp8_supported(device: torch.device) -> str | None:
    """None where `--quantization fp8` can run on `device`, else why not."""
    if device.type == "cpu":
        return None  # the quantize-dequantize reference
    if device.type != "cuda":
        return f"FP8 needs CUDA or the CPU reference, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return (f"FP8 matmuls with a scale per row need compute capability 9.0 or higher (Hopper); this GPU has "
                f"{major}.{minor}")
    return None


def scaled_matmul(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [m, k] (bf16/fp16) times an FP8 weight given transposed, weight_t [k, n] column-major with scales
    [1, n]: x quantized per row, then torch._scaled_mm with row-wise scales; [m, n] in x's dtype. Rows are
    padded to a multiple of 16 for the kernel."""
    m = x.shape[0]
    rows = -(-m // SCALED_MM_MULTIPLE) * SCALED_MM_MULTIPLE
    if rows != m:
        x = torch.cat([x, x.new_zeros(rows - m, x.shape[1])])
    q, scale = quantize_rows(x)
    y = torch._scaled_mm(q, weight_t, scale_a=scale, scale_b=weight_scale, out_dtype=torch.bfloat16)
    return y[:m].to(x.dtype)
