"""Embed, score or classify a file to a .npy, in one process or under torchrun at any tp and dp.

    tp-embed-offline --input texts.txt --output vectors.npy
    torchrun --nproc-per-node 4 -m tp_embed.offline --tp 2 --dp 2 --input texts.txt --output vectors.npy
    tp-embed-offline --model-path ms-marco-MiniLM-L-6-v2 --input pairs.jsonl --output scores.npy

--task embed (an embedding model's default): one text per line (or a .jsonl file with a "text" field per
line); row i of the output is text i, pooled, truncated to --dimensions and normalized as the server would
answer by default.
--task score (a cross-encoder's or reranker's default): a .jsonl file of pairs, {"query": ..., "document": ...}
(or "text_1" and "text_2") a line; element i of the float32 [n] output is pair i's score as /v1/score gives
it (sigmoid of the logit; --raw-scores for the logit; an embedding model gives the cosine).
--task classify (a classifier's default): texts as for embed; row i of the float32 [n, num_labels] output is
text i's probabilities as /v1/classify gives them.
With --dp, global rank 0 hands the batches to every tensor-parallel group at once and writes the one output.
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


def jsonl_records(path: str):
    """(line number, object) for each non-blank line of a .jsonl file; ValueError naming a line that is not
    JSON or not an object."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
        yield n, record if isinstance(record, dict) else {}


def read_texts(path: str) -> list[str]:
    """The texts of a file, one a line, or of a .jsonl file's "text" fields (blank lines skipped).
    Raises OSError, or ValueError naming the line."""
    if not path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    texts = []
    for n, record in jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{path}, line {n}: expected an object with a string \"text\" field")
        texts.append(record["text"])
    return texts


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(query, document) from each line of a .jsonl file: "query" and "document", or "text_1" and "text_2".
    Raises OSError, or ValueError naming the line."""
    if not path.endswith(".jsonl"):
        raise ValueError(f"{path}: --task score reads a .jsonl file of {{\"query\", \"document\"}} lines")
    pairs = []
    for n, record in jsonl_records(path):
        first, second = ("text_1", "text_2") if "text_1" in record else ("query", "document")
        if not all(isinstance(record.get(k), str) and record[k] for k in (first, second)):
            raise ValueError(f"{path}, line {n}: expected an object with non-empty string \"query\" and "
                             f"\"document\" (or \"text_1\" and \"text_2\") fields")
        pairs.append((record[first], record[second]))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    g = p.add_argument_group("offline")
    g.add_argument("--task", choices=["embed", "score", "classify"], default=None,
                   help="what to compute (default: embed for an embedding model, score for a cross-encoder or "
                        "reranker, classify for a classifier)")
    g.add_argument("--input", required=True,
                   help="embed, classify: text file, one text per line, or .jsonl with a 'text' field; score: "
                        ".jsonl with 'query' and 'document' (or 'text_1' and 'text_2') fields")
    g.add_argument("--output", required=True,
                   help="where to write the .npy: float32 [n, dim] vectors, [n] scores or [n, labels] probabilities")
    g.add_argument("--instruction", default=None, help="score: the instruction of a reranker's prompt (Qwen3-Reranker)")
    g.add_argument("--raw-scores", action="store_true", help="score: the logits instead of their sigmoid")
    g.add_argument("--dimensions", type=int, default=None, help="Matryoshka: keep the first N components")
    g.add_argument("--prompt-name", default=None,
                   help="prepend a named prompt from the model's sentence-transformers config (e.g. query)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def holds_pairs(path: str) -> bool:
    """Whether a .jsonl file's first record is a pair ("query" or "text_1")."""
    if not path.endswith(".jsonl"):
        return False
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and ("query" in record or "text_1" in record)


def load_input(args) -> list:
    """Rank 0, before the model loads: the texts (or pairs, for --task score or a .jsonl of pairs), and a
    check that the output can be written where asked."""
    pairs = args.task == "score" or (args.task is None and holds_pairs(args.input))
    texts = read_pairs(args.input) if pairs else read_texts(args.input)
    if not texts:
        raise ValueError(f"{args.input} holds no {'pairs' if pairs else 'texts'}")
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
    from tp_embed.openai_protocol import APIError
    from tp_embed.pooling import MatryoshkaError
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
        out = compute(engine, args, texts, lanes)
        np.save(args.output, out.numpy().astype(np.float32))
        print(f"wrote {args.output}: {' x '.join(map(str, out.shape))}", file=sys.stderr)
        rc = 0
    except (OSError, ValueError, KeyError, InputTooLongError, MatryoshkaError, APIError) as e:
        print(f"error: {getattr(e, 'message', e)}", file=sys.stderr)
        rc = 2
    for lane in lanes:
        lane.stop_workers()
    destroy_distributed()
    return rc


def compute(engine, args, data: list, lanes: list):
    """Rank 0: the output tensor of --task for the texts or pairs in `data`."""
    from tp_embed.pooling import check_dimensions, combine_windows, truncate_and_normalize
    from tp_embed.scoring import ScoringModel, probabilities, score_pairs
    from tp_embed.text import LengthPolicy

    pairs = isinstance(data[0], tuple)
    task = args.task or ("score" if pairs else "embed" if "embed" in engine.tasks else "classify")
    if task not in engine.tasks:
        raise ValueError(f"--task {task}: {engine.model_name} serves {', '.join(engine.tasks)}")
    if pairs != (task == "score"):
        raise ValueError(f"--task {task} reads {'pairs' if task == 'score' else 'texts'}; {args.input} holds "
                         f"{'pairs' if pairs else 'texts'}")
    progress = not args.no_progress
    if task == "score":
        model = ScoringModel(engine.model_name, engine.tasks, engine.config.head, len(data), args.allow_auto_truncate)
        queries, documents = [q for q, _ in data], [d for _, d in data]
        names = [f"line {i + 1}'s query" for i in range(len(data))]
        sequences, starts, to_scores = score_pairs(model, engine.text, queries, documents, args.instruction,
                                                   args.raw_scores, "query", names)
        return to_scores(engine.embed(sequences, lanes=lanes, show_progress=progress, type_starts=starts))
    if args.instruction is not None or args.raw_scores:
        raise ValueError("--instruction and --raw-scores apply to --task score")
    if task == "classify":
        sequences = engine.text.encode(data, truncate=args.allow_auto_truncate)
        return probabilities(engine.embed(sequences, lanes=lanes, show_progress=progress), engine.config.head)
    check_dimensions(args.dimensions, engine.embedding_size, engine.matryoshka_dimensions, engine.is_matryoshka)
    policy = LengthPolicy(args.long_inputs, max_input_tokens=args.max_input_tokens)
    windows = engine.text.encode_windows(data, policy, engine.text.prompt(args.prompt_name))
    sequences = [s for w in windows for s in w]
    pooled = engine.embed(sequences, lanes=lanes, show_progress=progress)
    if len(sequences) > len(windows):  # --long-inputs chunk cut some inputs into windows
        pooled = combine_windows(pooled, [len(w) for w in windows], [len(s) for s in sequences], engine.pooling)
    return truncate_and_normalize(pooled, args.dimensions, engine.normalize)


def cli() -> None:
    """`tp-embed-offline` and `python -m tp_embed.offline`."""
    code = main(sys.argv[1:], own_process=True)
    from tp_embed.distributed import exit_process
    exit_process(code)


if __name__ == "__main__":
    cli()
