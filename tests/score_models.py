"""Run under torchrun by the reranker tests: score pairs and classify texts with several models in one job.

    torchrun --nproc-per-node N tests/score_models.py SPEC.json

SPEC: {"tp": N, "out_dir": DIR, "models": [{"name", "flags": [...], "pairs": [[query, document], ...],
"texts": [...], "instruction": str | null}]}. Rank 0 writes, for a model that scores, DIR/NAME.scores.npy
and DIR/NAME.raw.npy (the pairs in one call, packed into mixed batches, as /v1/score's function gives them),
and for one that classifies, DIR/NAME.probs.npy; every rank writes DIR/NAME.rank{R}.json with what the
loader read.
"""

import argparse
import json
import os
import sys

import numpy as np

from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import EngineConfig
from tp_embed.distributed import destroy_distributed, exit_process
from tp_embed.engine import Engine
from tp_embed.scoring import ScoringModel, probabilities, score_pairs


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for model in spec["models"]:
        p = argparse.ArgumentParser()
        add_engine_args(p)
        args = parse_with_config(p, ["--tp", str(spec["tp"])] + model["flags"])
        engine = Engine(EngineConfig.from_args(args), show_progress=False)
        name = os.path.join(spec["out_dir"], model["name"])
        with open(f"{name}.rank{engine.dist.tp_rank}.json", "w") as f:
            json.dump({**engine.load_stats, "tasks": list(engine.tasks)}, f)
        if not engine.is_driver:
            engine.worker_loop()
            continue
        scoring = ScoringModel(engine.model_name, engine.tasks, engine.config.head, 10 ** 6, False)
        if "score" in engine.tasks and model.get("pairs"):
            queries, documents = zip(*model["pairs"])
            for raw, suffix in ((False, "scores"), (True, "raw")):
                sequences, starts, to_scores = score_pairs(scoring, engine.text, list(queries), list(documents),
                                                           model.get("instruction"), raw, "query",
                                                           ["query"] * len(queries))
                np.save(f"{name}.{suffix}.npy", to_scores(engine.embed(sequences, type_starts=starts)).numpy())
            with open(f"{name}.tokens.json", "w") as f:
                json.dump([len(s) for s in sequences], f)
        if "classify" in engine.tasks and model.get("texts"):
            logits = engine.embed(engine.text.encode(model["texts"], truncate=False))
            np.save(f"{name}.probs.npy", probabilities(logits, engine.config.head).numpy())
        engine.stop_workers()
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)
