"""Embed a file of texts to a .npy, in one process or under torchrun at any tp and dp.

    tp-embed-offline --input texts.txt --output vectors.npy
    torchrun --nproc-per-node 4 -m tp_embed.offline --tp 2 --dp 2 --input texts.txt --output vectors.npy

One text per line (or a .jsonl file with a "text" field per line). Row i of the output is text i,
pooled, truncated to --dimensions and normalized as the server would answer by default. With --dp,
global rank 0 hands the batches to every tensor-parallel group at once and writes the one output.
"""

import argparse
import json
import logging
import os
import sys

# nothing here imports torch before setup_host_allocator, which may re-execute the process with tcmalloc
# preloaded (as tp_embed/launch.py does for the server): torch then loads once
from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.host_allocator import runs_on_cpu, setup_host_allocator


def read_texts(path: str) -> list[str]:
    """The texts of a file, one a line, or of a .jsonl file's "text" fields (blank lines skipped).
    Raises OSError, or ValueError naming the line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not path.endswith(".jsonl"):
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}, line {n}: expected an object with a string \"text\" field")
        texts.append(record["text"])
    return texts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    g = p.add_argument_group("offline")
    g.add_argument("--input", required=True, help="text file, one text per line, or .jsonl with a 'text' field")
    g.add_argument("--output", required=True, help="where to write the float32 [num_texts, dim] .npy")
    g.add_argument("--dimensions", type=int, default=None, help="Matryoshka: keep the first N components")
    g.add_argument("--prompt-name", default=None,
                   help="prepend a named prompt from the model's sentence-transformers config (e.g. query)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def load_input(args) -> list[str]:
    """Rank 0, before the model loads: the texts, and a check that the output can be written where asked."""
    texts = read_texts(args.input)
    if not texts:
        raise ValueError(f"{args.input} holds no texts")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--output {args.output}: no such directory {out_dir}")
    return texts


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Embed --input to --output; returns the exit status. own_process: this call is the process's program
    (`cli`), so it may choose the allocator, which can re-execute the process; called from other Python
    code (own_process False) the process is left as it is."""
    args = parse_with_config(build_parser(), argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        if own_process:
            setup_host_allocator(args.host_allocator, runs_on_cpu(args.device))  # may re-execute this process
        # a bad input file is reported before minutes of loading (under torchrun the other ranks end too)
        texts = load_input(args) if int(os.environ.get("RANK", "0")) == 0 else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import numpy as np

    from tp_embed.config import ConfigError, EngineConfig
    from tp_embed.distributed import destroy_distributed
    from tp_embed.engine import Engine
    from tp_embed.pooling import MatryoshkaError, check_dimensions, truncate_and_normalize
    from tp_embed.text import InputTooLongError

    try:
        engine = Engine(EngineConfig.from_args(args), show_progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if texts is None:  # every rank but global rank 0: lead a data-parallel group or follow a leader
        engine.run()
        destroy_distributed()
        return 0
    lanes = engine.groups()
    try:
        check_dimensions(args.dimensions, engine.embedding_size, engine.matryoshka_dimensions, engine.is_matryoshka)
        prompt = engine.text.prompt(args.prompt_name)
        sequences = engine.text.encode(texts, truncate=args.allow_auto_truncate, prompt=prompt)
        pooled = engine.embed(sequences, lanes=lanes, show_progress=not args.no_progress)
        vectors = truncate_and_normalize(pooled, args.dimensions, engine.normalize)
        np.save(args.output, vectors.numpy().astype(np.float32))
        print(f"wrote {args.output}: {vectors.shape[0]} x {vectors.shape[1]}", file=sys.stderr)
        rc = 0
    except (OSError, ValueError, KeyError, InputTooLongError, MatryoshkaError) as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    for lane in lanes:
        lane.stop_workers()
    destroy_distributed()
    return rc


def cli() -> None:
    """`tp-embed-offline` and `python -m tp_embed.offline`."""
    code = main(sys.argv[1:], own_process=True)
    from tp_embed.distributed import exit_process
    exit_process(code)


if __name__ == "__main__":
    cli()
