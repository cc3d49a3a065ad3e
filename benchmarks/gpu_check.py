"""One command for a lent GPU: correctness of the CUDA paths and speed against transformers.

    python benchmarks/gpu_check.py --out results/gpu   # ~5-8 minutes on one H100/H200, no network

On a lent GPU machine (no network), fetch its wheels and tokenizer here first with
benchmarks/device_wheels.sh, which also prints the one device command that installs them and runs this.

Steps, each recorded even when a later one fails:
  1. environment: GPU name, memory, clocks (NVML), torch / transformers / flashinfer versions (the
     import check)
  2. throughput: a measured bf16 8192^3 matmul peak, then engine tokens/s and model FLOP utilization
     for a random model with e5-mistral-7b's shape (bf16) at 128-, 512- and 2048-token inputs and a
     mixed-length batch, next to transformers' MistralModel (SDPA, padded batches) on the same GPU; and a
     profile of two 512-token batches: GPU time by kind of kernel (GEMM, attention, norm, activation, rotary)
  3. the sharded CUDA path at tp = 2 on one GPU (gloo): offline embeddings vs tp = 1, float32 and bf16
  4. FlashInfer vs SDPA on random packed batches (the GPU-marked tests of tests/test_attention.py), and
     captured CUDA graphs against the eager pass (tests/test_cuda_graphs.py's)
  4b. the newer families (MPNet, ModernBERT, EmbeddingGemma, Gemma 2 with head dim 64 so FlashInfer takes
     it) on tiny checkpoints: CUDA bf16 and float32 at tp = 1 and 2 against the CPU float32 path (which
     tests/test_mpnet.py, test_modernbert.py and test_gemma.py hold to sentence-transformers)
  4c. --quantization fp8 against bf16 on the e5-mistral-7b shape: tokens/s at 512-token inputs and the
     per-vector cosine, and tests/test_fp8.py's torch._scaled_mm test
  4d. --fused-ops auto (FlashInfer's RMSNorm, residual add + RMSNorm and gated activations) against off on
     the same shape, and tests/test_fused_ops.py's GPU tests
  4e. BERT base's shape over HTTP (bench_serving.py on the same host): requests/s and p50 at concurrency 1
     and 64, one ~32-token input a request, base64 answers; eagerly and with --cuda-graph-max-tokens
  5. the batch budget: the startup profiling pass caps an oversized --max-batch-tokens to free memory,
     and a batch of the capped size runs
It writes gpu_check.json and gpu_check.md to --out.
"""

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_engine  # noqa: E402
from shapes import write_tiny_tokenizer  # noqa: E402

E5_MISTRAL_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                        rms_norm_eps=1e-5, rope_theta=10000.0)


def write_shape_dir(path: str, shape: dict, architecture: str = "MistralModel") -> str:
    from transformers import MistralConfig

    os.makedirs(path, exist_ok=True)
    cfg = MistralConfig(**shape)
    cfg.architectures = [architecture]
    cfg.save_pretrained(path)
    write_tiny_tokenizer(path, shape["vocab_size"])
    return path


def step_environment() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2 ** 30}
    try:
        import flashinfer
        info["flashinfer"] = flashinfer.__version__
    except Exception as e:  # the import check: report, don't stop
        info["flashinfer"] = f"import failed: {type(e).__name__}: {e}"
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        info["sm_clock_max_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        info["mem_clock_max_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as e:
        info["nvml"] = f"unavailable: {e}"
    return info


def step_flashinfer_tests() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", "test_attention.py"),
                           os.path.join(ROOT, "tests", "test_cuda_graphs.py")],
                          capture_output=True, text=True, cwd=ROOT)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"returncode": proc.returncode, "summary": tail, "output": proc.stdout[-3000:] + proc.stderr[-2000:]}


def step_tp2_one_gpu(work: str) -> dict:
    """Offline embeddings at tp = 2 (two processes on one GPU, gloo) against tp = 1."""
    import numpy as np
    from transformers import MistralConfig, MistralForCausalLM

    model_dir = os.path.join(work, "tiny-mistral")
    torch.manual_seed(0)
    shape = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1003, max_position_embeddings=4096)
    model = MistralForCausalLM(MistralConfig(**shape))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.save_pretrained(model_dir)
    write_tiny_tokenizer(model_dir, 1003)
    texts = os.path.join(work, "texts.txt")
    with open(texts, "w") as f:
        for i in range(24):
            f.write(" ".join(f"w{(i * 7 + j) % 997 + 1}" for j in range(1 + (i * 37) % 300)) + "\n")
    results = {}
    for dtype in ("float32", "bfloat16"):
        outs = {}
        for tp in (1, 2):
            out = os.path.join(work, f"tp{tp}-{dtype}.npy")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
                   "-m", "tp_embed.offline", "--model-path", model_dir, "--tp", str(tp), "--device", "cuda",
                   "--dist-backend", "gloo", "--dtype", dtype, "--input", texts, "--output", out]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
            if proc.returncode != 0:
                results[f"{dtype}_tp{tp}_error"] = proc.stderr[-2000:]
                break
            outs[tp] = np.load(out)
        if len(outs) == 2:
            cos = (outs[1] * outs[2]).sum(1) / (np.linalg.norm(outs[1], axis=1) * np.linalg.norm(outs[2], axis=1))
            results[f"{dtype}_min_cosine_tp2_vs_tp1"] = float(cos.min())
    return results


def offline_embed(model_dir: str, texts: str, out: str, tp: int, device: str, dtype: str) -> str | None:
    """tp_embed.offline at tp (gloo; on one GPU every rank shares it) -> out.npy; the error tail, or None."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
           "-m", "tp_embed.offline", "--model-path", model_dir, "--tp", str(tp), "--device", device,
           "--dist-backend", "gloo", "--dtype", dtype, "--input", texts, "--output", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc.stderr[-2000:] if proc.returncode != 0 else None


def step_families(work: str, device: str = "cuda") -> dict:
    """The newer families' tiny checkpoints on `device` in bf16 and float32 at tp = 1 and 2, against the CPU
    float32 path: the minimum cosine per (family, dtype, tp)."""
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import tiny_gemma
    import tiny_models
    import tiny_modernbert
    import tiny_mpnet

    root = os.path.join(work, "families")
    models = {
        "mpnet": tiny_mpnet.make_mpnet(os.path.join(root, "mpnet")),
        "modernbert": tiny_modernbert.make_modernbert(os.path.join(root, "modernbert")),
        "embeddinggemma": tiny_gemma.make_embeddinggemma(os.path.join(root, "embeddinggemma")),
        # head dim 64: FlashInfer's causal window and soft-cap, not the padded SDPA fallback
        "gemma2": tiny_gemma.make_gemma2(os.path.join(root, "gemma2"), head_dim=64),
    }
    texts = os.path.join(root, "texts.txt")
    with open(texts, "w") as f:
        f.write("\n".join(t.replace("\n", " ") for t in tiny_models.MIXED_TEXTS) + "\n")
    results = {}
    for name, model_dir in models.items():
        ref_path = os.path.join(root, f"{name}-cpu.npy")
        error = offline_embed(model_dir, texts, ref_path, 1, "cpu", "float32")
        if error:
            results[f"{name}_cpu_error"] = error
            continue
        ref = np.load(ref_path)
        for dtype in ("float32", "bfloat16"):
            for tp in (1, 2):
                out = os.path.join(root, f"{name}-{dtype}-tp{tp}.npy")
                error = offline_embed(model_dir, texts, out, tp, device, dtype)
                if error:
                    results[f"{name}_{dtype}_tp{tp}_error"] = error
                    continue
                ours = np.load(out)
                cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
                results[f"{name}_{dtype}_tp{tp}_min_cosine"] = float(cos.min())
    return results


def transformers_tokens_per_s(shape: dict, seq_lens: list[int], batch_tokens: int, warmup: int, iters: int,
                              mixed_lens: list[int]) -> list[dict]:
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(**shape)
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = MistralModel(cfg).eval()
    torch.set_default_dtype(torch.float32)
    device = torch.device("cuda")
    points = []
    gen = torch.Generator().manual_seed(0)

    # the model is an argument, not a closure cell that the `del model` below empties
    def run(net, ids, mask):
        with torch.inference_mode():
            h = net(input_ids=ids, attention_mask=mask).last_hidden_state
            return h[:, -1]

    for seq_len in seq_lens:
        num_seqs = max(1, batch_tokens // seq_len)
        ids = torch.randint(0, shape["vocab_size"], (num_seqs, seq_len), generator=gen).cuda()
        mask = torch.ones_like(ids)
        sec = bench_engine.time_forward(functools.partial(run, model, ids, mask), device, warmup, iters)
        points.append({"seq_len": seq_len, "num_seqs": num_seqs, "tokens_per_s": num_seqs * seq_len / sec})
    # mixed lengths: transformers pads every sequence to the longest (left padding for last-token pooling)
    longest = max(mixed_lens)
    ids = torch.zeros(len(mixed_lens), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(mixed_lens):
        ids[i, longest - n:] = torch.randint(1, shape["vocab_size"], (n,), generator=gen)
        mask[i, longest - n:] = 1
    ids, mask = ids.cuda(), mask.cuda()
    sec = bench_engine.time_forward(functools.partial(run, model, ids, mask), device, warmup, iters)
    points.append({"seq_len": "mixed", "num_seqs": len(mixed_lens), "tokens_per_s": sum(mixed_lens) / sec})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return points


def step_throughput(work: str, seq_lens: list[int], batch_tokens: int, warmup: int, iters: int) -> dict:
    from tp_embed.args import add_engine_args, parse_with_config
    from tp_embed.config import EngineConfig
    from tp_embed.engine import Engine

    shape_dir = write_shape_dir(os.path.join(work, "e5-mistral-shape"), E5_MISTRAL_SHAPE)
    peak = bench_engine.matmul_peak_tflops(torch.device("cuda"))
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = parse_with_config(p, ["--model-path", shape_dir, "--load-format", "dummy", "--dtype", "bfloat16",
                                 "--device", "cuda", "--max-batch-tokens", str(batch_tokens),
                                 "--max-batch-seqs", "4096"])
    engine = Engine(EngineConfig.from_args(args), show_progress=False)
    ours = bench_engine.bench_points(engine, seq_lens, [batch_tokens], warmup, iters, peak)
    gen = torch.Generator().manual_seed(1)
    mixed_lens = []
    while sum(mixed_lens) < batch_tokens - 1024:
        mixed_lens.append(int(torch.randint(64, 1025, (1,), generator=gen)))
    seqs = [torch.randint(0, 32000, (n,), generator=gen).tolist() for n in mixed_lens]
    sec = bench_engine.time_forward(functools.partial(engine.forward_pooled, seqs), engine.device, warmup, iters)
    ours.append({"seq_len": "mixed", "num_seqs": len(seqs), "tokens_per_s": sum(mixed_lens) / sec})
    attention = "flashinfer" if engine.model.layers and _uses_flashinfer(engine) else "sdpa"
    try:
        breakdown = kernel_breakdown(engine, 512, batch_tokens)
    except Exception:  # the profile is extra: a profiler that fails leaves the throughput figures standing
        breakdown = {"error": traceback.format_exc()[-1500:]}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    theirs = transformers_tokens_per_s(E5_MISTRAL_SHAPE, seq_lens, batch_tokens, warmup, iters, mixed_lens)
    return {"matmul_peak_tflops": peak, "attention": attention, "ours": ours, "transformers": theirs,
            "batch_tokens": batch_tokens, "mixed_lens": mixed_lens, "kernel_breakdown": breakdown}


# kinds of kernel by what their names contain (lower case), first match wins; the rest is "other"
KERNEL_KINDS = (("attention", ("prefill", "fmha", "flash", "attention")),
                ("norm", ("rmsnorm", "layer_norm", "layernorm")),
                ("activation", ("silu", "gelu", "and_mul")),
                ("rotary", ("rope", "rotary")),
                ("all-reduce", ("nccl", "allreduce", "all_reduce")),
                ("gemm", ("gemm", "cutlass", "xmma", "cublas", "nvjet", "matmul", "scaled_mm")))


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lower for k in keys)), "other")


def kernel_breakdown(engine, seq_len: int, batch_tokens: int, iters: int = 2) -> dict:
    """Where the forward pass's time goes, for the MFU line: `iters` profiled batches of seq_len-token inputs,
    the kernels' own time summed by kind (KERNEL_KINDS) as shares of the total, and the ten longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    seqs = [[1] * seq_len] * max(1, batch_tokens // seq_len)
    engine.forward_pooled(seqs)
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            engine.forward_pooled(seqs)
        if cuda:
            torch.cuda.synchronize(engine.device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    times = [(e.key, getattr(e, attr)) for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(t for _, t in times) or 1.0
    kinds = {}
    for name, t in times:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    longest = sorted(times, key=lambda x: -x[1])[:10]
    return {"seq_len": seq_len, "batches": iters, "total_ms": total / 1000,
            "share_by_kind": {k: round(v / total, 4) for k, v in sorted(kinds.items(), key=lambda x: -x[1])},
            "longest": [{"kernel": n[:120], "ms": t / 1000, "kind": kernel_kind(n)} for n, t in longest]}


def step_variants(work: str, variants: dict, test_file: str, batch_tokens: int, warmup: int, iters: int,
                  seq_len: int = 512) -> dict:
    """Engines that differ by flags (variants: name -> extra flags; the first is the baseline) on e5-mistral-7b's
    shape (random bf16 weights): tokens/s at seq_len-token inputs and each one's per-vector cosine to the
    baseline on the same inputs; plus `test_file`'s GPU-marked tests."""
    import numpy as np

    from tp_embed.args import add_engine_args, parse_with_config
    from tp_embed.config import EngineConfig
    from tp_embed.engine import Engine

    shape_dir = write_shape_dir(os.path.join(work, "e5-mistral-shape"), E5_MISTRAL_SHAPE)
    gen = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, 32000, (max(1, batch_tokens // seq_len), seq_len), generator=gen).tolist()
    result, vectors = {}, {}
    for name, extra in variants.items():
        p = argparse.ArgumentParser()
        add_engine_args(p)
        args = parse_with_config(p, ["--model-path", shape_dir, "--load-format", "dummy", "--dtype", "bfloat16",
                                     "--device", "cuda", "--max-batch-tokens", str(batch_tokens),
                                     "--max-batch-seqs", "4096", *extra])
        engine = Engine(EngineConfig.from_args(args), show_progress=False)
        sec = bench_engine.time_forward(functools.partial(engine.forward_pooled, seqs), engine.device, warmup, iters)
        result[f"{name}_tokens_per_s"] = len(seqs) * seq_len / sec
        vectors[name] = engine.forward_pooled(seqs).float().numpy()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    base, *others = variants
    a = vectors[base]
    for name in others:
        b = vectors[name]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        result.update({f"{name}_speedup": result[f"{name}_tokens_per_s"] / result[f"{base}_tokens_per_s"],
                       f"{name}_min_cosine": float(cos.min()), f"{name}_median_cosine": float(np.median(cos))})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", test_file)], capture_output=True, text=True, cwd=ROOT)
    result["tests"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return result


def step_http_small(work: str, tokenizer_dir: str | None, num_requests: int = 4000, device: str = "cuda",
                    graph_tokens: int = 256) -> dict:
    """#22's small-model line: BERT base's shape (bge-base-en-v1.5, random bf16 weights) served on this GPU,
    bench_serving.py on the same host sending one ~32-token input a request with base64 answers, at
    concurrency 1 and 64; eagerly, then with CUDA graphs for batches of up to `graph_tokens` tokens (0: eager
    only). `tokenizer_dir`: a real WordPiece tokenizer to copy in (all-MiniLM-L6-v2's: the device has no hub);
    else the word-level benchmark tokenizer."""
    import shutil

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from shapes import write_shape

    shape = write_shape(os.path.join(work, "bge-base-shape"), "bge-base-en-v1.5")
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "special_tokens", "vocab")):
                shutil.copy(os.path.join(tokenizer_dir, name), shape)
    words = "24" if tokenizer_dir else "30"  # about 32 tokens with [CLS] and [SEP] either way
    result = {"tokenizer": "all-MiniLM-L6-v2's" if tokenizer_dir else "word-level"}
    args = ["--model-path", shape, "--load-format", "dummy", "--device", device]
    runs = {"eager": args} | ({"cuda_graphs": args + ["--cuda-graph-max-tokens", str(graph_tokens)]}
                             if graph_tokens else {})
    for name, server_args in runs.items():
        result[name] = serve_and_bench(work, name, server_args, num_requests, words)
    result["points"] = result["eager"].get("points")  # the headline: eager, as before CUDA graphs
    return result


STAGE_METRICS = {"request": "tp_embed_request_latency_seconds", "tokenize": "tp_embed_tokenize_seconds",
                 "queue_and_forward": "tp_embed_queue_seconds", "batch_forward": "tp_embed_batch_forward_seconds",
                 "batch_inputs": "tp_embed_batch_inputs"}


def metric_totals(url: str) -> dict:
    """(sum, count) of each STAGE_METRICS histogram from the server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    totals = {}
    for stage, name in STAGE_METRICS.items():
        values = {}
        for line in text.splitlines():
            for part in ("sum", "count"):
                if line.startswith(f"{name}_{part} "):
                    values[part] = float(line.split()[1])
        totals[stage] = (values.get("sum", 0.0), values.get("count", 0.0))
    return totals


def stage_means(before: dict, after: dict) -> dict:
    """Where a request's time went between two /metrics snapshots: mean milliseconds per request (request,
    tokenize, queue_and_forward: admission to the last row), per batch (batch_forward), and inputs per batch."""
    means = {}
    for stage in STAGE_METRICS:
        total, count = (a - b for a, b in zip(after[stage], before[stage]))
        if count:
            means[stage if stage == "batch_inputs" else f"{stage}_ms"] = (
                total / count if stage == "batch_inputs" else 1000 * total / count)
    return means


def serve_and_bench(work: str, name: str, server_args: list[str], num_requests: int, words: str) -> dict:
    """One server (tests/server_utils.py) and bench_serving.py against it at concurrency 1, then 64, with the
    server's stage times (its /metrics histograms) over each."""
    from server_utils import ServerProcess

    result = {"args": server_args[4:], "points": [], "bench_output": ""}
    with ServerProcess(server_args, nproc=1, log_path=os.path.join(work, f"http_small_{name}.log")) as server:
        for concurrency in (1, 64):
            out = os.path.join(work, f"http_small_{name}_{concurrency}.json")
            before = metric_totals(server.url)
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_serving.py"), "--base-url",
                                   server.url, "--inputs-per-request", "1", "--concurrency", str(concurrency),
                                   "--num-requests", str(num_requests), "--synthetic-min-words", words,
                                   "--synthetic-max-words", words, "--encoding-format", "base64", "--no-progress",
                                   "--output-json", out], capture_output=True, text=True, cwd=ROOT)
            result["bench_output"] += proc.stdout[-1500:] + proc.stderr[-800:]
            if proc.returncode != 0:
                continue
            with open(out) as f:
                point = json.load(f)["points"][0]
            point = {k: point[k] for k in ("concurrency", "requests_per_s", "latency_p50_ms", "latency_p99_ms",
                                           "num_errors", "client_cpu_percent")}
            point["server_stages"] = stage_means(before, metric_totals(server.url))
            result["points"].append(point)
    with open(os.path.join(work, f"http_small_{name}.log")) as f:
        result["server_log_tail"] = f.read()[-1500:]
    return result


def step_batch_budget(work: str) -> dict:
    """The startup profiling pass caps --max-batch-tokens to free memory, and a batch of the capped
    size then runs without running out of memory. Two layers of e5-mistral-7b's shape, bf16, asked for
    a budget far past what fits (4M tokens), 128-token inputs, SDPA (memory linear in batch tokens)."""
    from tp_embed.args import add_engine_args, parse_with_config
    from tp_embed.config import EngineConfig
    from tp_embed.engine import Engine

    shape = dict(E5_MISTRAL_SHAPE, num_hidden_layers=2)
    shape_dir = write_shape_dir(os.path.join(work, "e5-mistral-2-layers"), shape)
    p = argparse.ArgumentParser()
    add_engine_args(p)
    requested = 4_000_000
    args = parse_with_config(p, ["--model-path", shape_dir, "--load-format", "dummy", "--dtype", "bfloat16",
                                 "--device", "cuda", "--attention-backend", "sdpa",
                                 "--max-batch-tokens", str(requested), "--max-batch-seqs", "1000000"])
    engine = Engine(EngineConfig.from_args(args), show_progress=False)
    budget = engine.max_batch_tokens
    seq_len = 128
    seqs = [[1] * seq_len] * (budget // seq_len)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.forward_pooled(seqs)
    torch.cuda.synchronize()
    result = {"requested_tokens": requested, "capped_tokens": budget, "batch_tokens_run": len(seqs) * seq_len,
              "seconds": time.perf_counter() - t0, "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
              "total_gib": torch.cuda.get_device_properties(0).total_memory / 2 ** 30}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _uses_flashinfer(engine) -> bool:
    from tp_embed.layers.attention import FlashInferAttention, select_attention
    return select_attention(engine.device, engine.dtype, engine.config.head_dim,
                            engine.attention_backend) is FlashInferAttention


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    lines = [f"GPU: {env.get('gpu')} ({env.get('gpu_memory_gib', 0):.0f} GiB), torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, flashinfer {env.get('flashinfer')}", ""]
    fi = result.get("flashinfer_tests")
    if fi:
        lines += [f"FlashInfer vs SDPA tests: {fi['summary']}", ""]
    tp2 = result.get("tp2_one_gpu")
    if tp2:
        lines += ["tp=2 on one GPU (gloo) vs tp=1: " + ", ".join(f"{k} = {v:.6f}" if isinstance(v, float) else k
                                                                for k, v in tp2.items()), ""]
    thr = result.get("throughput")
    if thr:
        lines += [f"e5-mistral-7b shape, random bf16 weights, batch budget {thr['batch_tokens']} tokens; "
                  f"measured bf16 matmul peak {thr['matmul_peak_tflops']:.0f} TFLOP/s; attention: {thr['attention']}",
                  "", "| input tokens | tp-embed tokens/s | MFU | transformers tokens/s | ratio |",
                  "|---:|---:|---:|---:|---:|"]
        for ours, theirs in zip(thr["ours"], thr["transformers"]):
            mfu = f"{100 * ours['mfu']:.1f}%" if "mfu" in ours else "n/a"
            lines.append(f"| {ours['seq_len']} | {ours['tokens_per_s']:,.0f} | {mfu} | "
                         f"{theirs['tokens_per_s']:,.0f} | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x |")
    breakdown = (result.get("throughput") or {}).get("kernel_breakdown") or {}
    if breakdown.get("share_by_kind"):
        lines += ["", f"GPU time by kind of kernel, {breakdown['seq_len']}-token inputs: " + ", ".join(
            f"{k} {v:.1%}" for k, v in breakdown["share_by_kind"].items())]
    for key, what, base, new in (("fp8", "FP8", "bf16", "fp8"), ("fused", "Fused ops", "unfused", "fused")):
        r = result.get(key)
        if r:
            lines += ["", f"{what} on the e5-mistral-7b shape, 512-token inputs: {r[f'{new}_tokens_per_s']:,.0f} "
                          f"tokens/s vs {base} {r[f'{base}_tokens_per_s']:,.0f} ({r[f'{new}_speedup']:.2f}x); cosine "
                          f"to {base} min {r[f'{new}_min_cosine']:.5f}, median {r[f'{new}_median_cosine']:.5f}; "
                          f"tests: {r['tests']}"]
    http = result.get("http_small") or {}
    for run in ("eager", "cuda_graphs"):
        if http.get(run, {}).get("points"):
            lines += ["", f"BERT base shape over HTTP ({run.replace('_', ' ')}), one ~32-token input a request, "
                          f"base64, {http['tokenizer']} tokenizer: " + "; ".join(
                              f"concurrency {p['concurrency']}: {p['requests_per_s']:,.0f} requests/s, p50 "
                              f"{p['latency_p50_ms']:.2f} ms, {p['num_errors']} errors; server means: "
                              + ", ".join(f"{k} {v:.2f}" for k, v in p.get("server_stages", {}).items())
                              for p in http[run]["points"])]
    families = result.get("families")
    if families:
        lines += ["", "Newer families, tiny checkpoints on CUDA vs the CPU float32 path: " + ", ".join(
            f"{k} = {v:.6f}" if isinstance(v, float) else k for k, v in families.items())]
    budget = result.get("batch_budget")
    if budget:
        lines += ["", f"Batch budget: asked {budget['requested_tokens']:,} tokens, the profiling pass capped it "
                      f"to {budget['capped_tokens']:,}; a batch of {budget['batch_tokens_run']:,} tokens then ran "
                      f"in {budget['seconds']:.1f} s, peak {budget['peak_gib']:.1f} of {budget['total_gib']:.0f} GiB"]
    for key, value in result.items():
        if key.endswith("_error"):
            lines += ["", f"{key}: {value.splitlines()[-1] if value else value}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/gpu", help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--seq-lens", type=bench_engine.int_list, default=[128, 512, 2048],
                   help="input lengths for the throughput step (default 128,512,2048)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per batch (default 16384)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per point (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed batches per point (default 5)")
    p.add_argument("--skip", default="",
                   help="comma-separated steps to skip: throughput,tp2,flashinfer,families,fp8,fused,http,budget")
    p.add_argument("--http-tokenizer", default=None, metavar="DIR",
                   help="tokenizer files for the http step (e.g. all-MiniLM-L6-v2's); default a word-level one")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    work = tempfile.mkdtemp(prefix="gpu_check-")
    # the throughput step first: it compiles the head-dim-128 kernels the later steps reuse
    steps = [("environment", step_environment),
             ("throughput", lambda: step_throughput(work, args.seq_lens, args.batch_tokens, args.warmup, args.iters)),
             ("tp2_one_gpu", lambda: step_tp2_one_gpu(work)),
             ("flashinfer_tests", step_flashinfer_tests),
             ("families", lambda: step_families(work)),
             ("fp8", lambda: step_variants(work, {"bf16": [], "fp8": ["--quantization", "fp8"]}, "test_fp8.py",
                                           args.batch_tokens, args.warmup, args.iters)),
             ("fused", lambda: step_variants(work, {"unfused": ["--fused-ops", "off"], "fused": []},
                                             "test_fused_ops.py", args.batch_tokens, args.warmup, args.iters)),
             ("http_small", lambda: step_http_small(work, args.http_tokenizer)),
             ("batch_budget", lambda: step_batch_budget(work))]
    names = {"flashinfer_tests": "flashinfer", "tp2_one_gpu": "tp2", "throughput": "throughput",
             "batch_budget": "budget", "families": "families", "fp8": "fp8", "fused": "fused", "http_small": "http"}
    for name, fn in steps:
        if names.get(name) in skip:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:
            result[f"{name}_error"] = traceback.format_exc()
        result[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)
    table = markdown(result)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
