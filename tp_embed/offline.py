"""Embed a file of texts to a .npy under torchrun, at any tp.

    torchrun --nproc-per-node 2 -m tp_embed.offline --tp 2 --input texts.txt --output vectors.npy

One text per line (or a .jsonl file with a "text" field per line). Row i of the output is text i,
pooled, truncated to --dimensions and normalized as the server would answer by default.
"""

import argparse
import json
import logging
import sys

import numpy as np

from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import ConfigError
from tp_embed.distributed import destroy_distributed, exit_process
from tp_embed.engine import Engine, InputTooLongError
from tp_embed.pooling import MatryoshkaError, check_dimensions, truncate_and_normalize


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in lines if line.strip()]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    g = p.add_argument_group("offline")
    g.add_argument("--input", required=True, help="text file, one text per line, or .jsonl with a 'text' field")
    g.add_argument("--output", required=True, help="where to write the float32 [num_texts, dim] .npy")
    g.add_argument("--dimensions", type=int, default=None, help="Matryoshka: keep the first N components")
    g.add_argument("--prompt-name", default=None,
                   help="prepend a named prompt from the model's sentence-transformers config (e.g. query)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_with_config(build_parser(), argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        engine = Engine(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not engine.is_driver:
        engine.worker_loop()
        destroy_distributed()
        return 0
    try:
        texts = read_texts(args.input)
        if not texts:
            raise ValueError(f"{args.input} holds no texts")
        check_dimensions(args.dimensions, engine.hidden_size, engine.matryoshka_dimensions, engine.is_matryoshka)
        prompt = engine.text.prompt(args.prompt_name)
        sequences = engine.text.encode(texts, truncate=args.allow_auto_truncate, prompt=prompt)
        vectors = truncate_and_normalize(engine.embed(sequences), args.dimensions, engine.normalize)
        np.save(args.output, vectors.numpy().astype(np.float32))
        print(f"wrote {args.output}: {vectors.shape[0]} x {vectors.shape[1]}", file=sys.stderr)
        rc = 0
    except (OSError, ValueError, KeyError, InputTooLongError, MatryoshkaError) as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    engine.stop_workers()
    destroy_distributed()
    return rc


if __name__ == "__main__":
    exit_process(main())
