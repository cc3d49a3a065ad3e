"""Engine throughput without HTTP, under torchrun at any tp.

    torchrun --nproc-per-node 2 benchmarks/bench_engine.py --tp 2 --seq-lens 128,512 --batch-tokens 8192
    python benchmarks/bench_engine.py --model-path cfg_dir --load-format dummy --dtype bfloat16 ...
    python benchmarks/bench_engine.py --shape gte-modernbert-base --seq-lens 128,512,2048

--shape NAME times a published model's shape with random weights (benchmarks/shapes.py lists them).

For each (input length, batch token budget) it packs budget // length inputs of that length into one
batch and times full forward passes (broadcast, every rank's shard, pooling) after warm-up. On CUDA it
also reports model FLOP utilization against a matrix-multiply peak it measures on the same device.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tp_embed.args import add_engine_args, parse_with_config  # noqa: E402
from tp_embed.config import EngineConfig, ModelConfig  # noqa: E402
from tp_embed.distributed import destroy_distributed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import SHAPES, write_shape  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one sequence of seq_len tokens: 2 per weight multiply-add in the
    projections and MLP, plus attention's q k^T and p v (2 * 2 * seq_len * heads * head_dim per layer,
    halved when causal since only the lower triangle is needed). Embedding lookups cost nothing."""
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    o = cfg.num_heads * d * h
    mlp = (3 if cfg.gated_mlp else 2) * h * cfg.intermediate_size
    attn = 4 * seq_len * cfg.num_heads * d * (0.5 if cfg.causal else 1.0)
    return cfg.num_layers * (2 * (qkv + o + mlp) + attn)


def matmul_peak_tflops(device: torch.device, dtype=torch.bfloat16, n: int = 8192, iters: int = 20) -> float:
    """Measured dense matmul throughput (TFLOP/s) of an n x n x n product on random data."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of fn() over iters runs after warmup runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def bench_points(engine, seq_lens: list[int], batch_tokens: list[int], warmup: int, iters: int,
                 peak_tflops: float | None) -> list[dict]:
    points = []
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    for budget in batch_tokens:
        for seq_len in seq_lens:
            num_seqs = max(1, budget // seq_len)
            seqs = torch.randint(0, vocab, (num_seqs, seq_len), generator=gen).tolist()
            seconds = time_forward(lambda: engine.forward_pooled(seqs), engine.device, warmup, iters)
            tokens = num_seqs * seq_len
            point = {"seq_len": seq_len, "batch_tokens": budget, "num_seqs": num_seqs,
                     "seconds_per_batch": seconds, "tokens_per_s": tokens / seconds}
            achieved = flops_per_token(engine.config, seq_len) * tokens / seconds / 1e12
            point["model_tflops"] = achieved  # all ranks together
            if peak_tflops:
                point["mfu"] = achieved / (peak_tflops * engine.config.tp_size)
            points.append(point)
    return points


def format_table(points: list[dict]) -> str:
    lines = ["| input tokens | batch tokens | inputs/batch | tokens/s | model TFLOP/s | MFU |",
             "|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        mfu = f"{100 * p['mfu']:.1f}%" if "mfu" in p else "n/a"
        lines.append(f"| {p['seq_len']} | {p['batch_tokens']} | {p['num_seqs']} | {p['tokens_per_s']:,.0f} "
                     f"| {p['model_tflops']:.2f} | {mfu} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--seq-lens", type=int_list, default=[128, 512, 2048],
                   help="input lengths in tokens, comma-separated (default 128,512,2048)")
    g.add_argument("--batch-tokens", type=int_list, default=None,
                   help="batch token budgets, comma-separated (default: --max-batch-tokens)")
    g.add_argument("--warmup", type=int, default=2, help="untimed batches per point (default 2)")
    g.add_argument("--iters", type=int, default=5, help="timed batches per point; the median is reported (default 5)")
    g.add_argument("--output-json", default=None, help="write the results here")
    g.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="time this published model's shape with random weights instead of --model-path")
    g.add_argument("--shape-layers", type=int, default=None,
                   help="with --shape: this many layers instead of the model's (a model too large for the machine)")
    return p


def main(argv: list[str] | None = None) -> list[dict] | None:
    from tp_embed.engine import Engine

    args = parse_with_config(build_parser(), argv)
    if args.shape:
        with tempfile.TemporaryDirectory() as tmp:
            args.model_path = write_shape(os.path.join(tmp, args.shape), args.shape, args.shape_layers)
            args.load_format = "dummy"
            engine = Engine(EngineConfig.from_args(args), show_progress=False)
    else:
        engine = Engine(EngineConfig.from_args(args), show_progress=False)
    if not engine.is_driver:
        engine.worker_loop()
        destroy_distributed()
        return None
    peak = matmul_peak_tflops(engine.device, engine.dtype) if engine.device.type == "cuda" else None
    points = bench_points(engine, args.seq_lens, args.batch_tokens or [engine.max_batch_tokens],
                          args.warmup, args.iters, peak)
    engine.stop_workers()
    destroy_distributed()
    result = {"model": engine.model_name, "tp": args.tp, "dtype": str(engine.dtype), "device": str(engine.device),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None},
              "torch": torch.__version__, "matmul_peak_tflops": peak, "points": points}
    print(format_table(points))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return points


if __name__ == "__main__":
    main()
