"""Run under torchrun by the model tests: embed a list of texts with several models in one job.

    torchrun --nproc-per-node N tests/embed_models.py SPEC.json

SPEC: {"tp": N, "out_dir": DIR, "texts": [...], "models": [{"name": ..., "flags": [...], "alone": bool}]}; a
model may carry its own "texts", and "token_outputs" (["sparse", "colbert"]: DIR/NAME.sparse.npy and
NAME.colbert.npy, the token head's rows [tokens, width] of the texts in one batch).
Rank 0 writes DIR/NAME.npy (the texts in one call, packed into mixed batches), DIR/NAME.alone.npy (each
text in a batch of its own) when asked; every rank writes DIR/NAME.rank{R}.json with its parameter bytes
and what the loader read. One job for all models saves starting torch once per model.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import EngineConfig
from tp_embed.distributed import destroy_distributed, exit_process
from tp_embed.engine import Engine
from tp_embed.layers.linear import named_weights
from tp_embed.pooling import truncate_and_normalize
from tp_embed.token_heads import OUTPUTS


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    out_dir, texts = spec["out_dir"], spec["texts"]
    for model in spec["models"]:
        p = argparse.ArgumentParser()
        add_engine_args(p)
        p.add_argument("--truncate", action="store_true")
        p.add_argument("--prompt-name", default=None)
        p.add_argument("--dimensions", type=int, default=None)
        args = parse_with_config(p, ["--tp", str(spec["tp"])] + model["flags"])
        engine = Engine(EngineConfig.from_args(args), show_progress=False)
        name = os.path.join(out_dir, model["name"])
        weights = list(named_weights(engine.model))  # oneDNN-packed copies included
        layer_bytes = sum(t.numel() * t.element_size() for n, t in weights if ".layers." in f".{n}")
        total_bytes = sum(t.numel() * t.element_size() for _, t in weights)
        with open(f"{name}.rank{engine.dist.tp_rank}.json", "w") as f:
            json.dump({"layer_param_bytes": layer_bytes, "param_bytes": total_bytes, **engine.load_stats}, f)
        if not engine.is_driver:
            engine.worker_loop()
            continue
        prompt = engine.text.prompt(args.prompt_name)
        seqs = engine.text.encode(model.get("texts", texts), truncate=args.truncate or args.allow_auto_truncate,
                                  prompt=prompt)

        def finish(vectors: torch.Tensor) -> np.ndarray:
            return truncate_and_normalize(vectors, args.dimensions, engine.normalize).numpy()

        np.save(f"{name}.npy", finish(engine.embed(seqs)))
        if model.get("alone"):
            np.save(f"{name}.alone.npy", finish(torch.cat([engine.forward_pooled([s]) for s in seqs])))
        with open(f"{name}.tokens.json", "w") as f:
            json.dump([len(s) for s in seqs], f)
        for output in model.get("token_outputs", ()):  # a token head's rows, every token of every text
            np.save(f"{name}.{output}.npy", engine.forward_tokens(seqs, OUTPUTS[output]).numpy())
        engine.stop_workers()
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)
