"""Run under torchrun by the multimodal model tests: embed lists of items (text or image references)
with several models in one job, through media.load_image and engine.embed_items, so images travel to the
workers in the broadcast protocol's pixel tensor.

    torchrun --nproc-per-node N tests/embed_items.py SPEC.json

SPEC: {"tp": N, "out_dir": DIR, "media": {MediaConfig fields},
       "models": [{"name": ..., "flags": [...], "items": [{"text": ...} | {"image": ref}, ...],
                   "alone": bool, "small_batches": bool, "truncate_items": [items...],
                   "bad": {"label": [items...]}}]}

Rank 0 writes DIR/NAME.npy (all items in one embed_items call, normalized as the server would);
NAME.alone.npy (each item in a call of its own) and NAME.small.npy (a 40-token budget and two images per
batch, so items spread over many batches) when asked; NAME.truncated.npy (truncate_items embedded with
the per-request truncate flag); NAME.texts.npy (the text items through
engine.text.encode + engine.embed, the server's text-only route); NAME.info.json with the engine's
normalize default and, per "bad" label, the error message embed_items raised (None if it raised none).
Errors are raised on rank 0 before anything is broadcast, so the workers keep serving after them.
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
from tp_embed.items import Item
from tp_embed.media import MediaConfig, load_image
from tp_embed.pooling import truncate_and_normalize


def build_items(specs: list[dict], media: MediaConfig) -> list[Item]:
    return [Item(text=s.get("text"), image=load_image(s["image"], media) if "image" in s else None)
            for s in specs]


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    media = MediaConfig(**spec.get("media", {}))
    for model in spec["models"]:
        p = argparse.ArgumentParser()
        add_engine_args(p)
        args = parse_with_config(p, ["--tp", str(spec["tp"])] + model["flags"])
        engine = Engine(EngineConfig.from_args(args), show_progress=False)
        if not engine.is_driver:
            engine.worker_loop()
            continue
        name = os.path.join(spec["out_dir"], model["name"])

        def embed(items: list[Item]) -> np.ndarray:
            return truncate_and_normalize(engine.embed_items(items), None, engine.normalize).numpy()

        items = build_items(model["items"], media)
        np.save(f"{name}.npy", embed(items))
        if model.get("alone"):
            np.save(f"{name}.alone.npy", np.concatenate([embed([item]) for item in items]))
        if model.get("small_batches"):
            engine.max_batch_tokens, engine.processor.max_batch_images = 40, 2
            np.save(f"{name}.small.npy", embed(items))
        if model.get("truncate_items"):
            vectors = engine.embed_items(build_items(model["truncate_items"], media), truncate=True)
            np.save(f"{name}.truncated.npy", truncate_and_normalize(vectors, None, engine.normalize).numpy())
        texts = [item.text for item in items if item.text is not None]
        if texts:
            vectors = engine.embed(engine.text.encode(texts, truncate=args.allow_auto_truncate))
            np.save(f"{name}.texts.npy", truncate_and_normalize(vectors, None, engine.normalize).numpy())
        errors = {}
        for label, bad in model.get("bad", {}).items():
            try:
                engine.embed_items(build_items(bad, media))
                errors[label] = None
            except ValueError as e:
                errors[label] = str(e)
        with open(f"{name}.info.json", "w") as f:
            json.dump({"normalize": engine.normalize, "errors": errors,
                       "embedding_size": engine.embedding_size}, f)
        engine.stop_workers()
    destroy_distributed()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
    exit_process(0)
