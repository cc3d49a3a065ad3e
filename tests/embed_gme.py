"""Run under torchrun by tests/test_gme.py: embed multimodal items with Qwen2-VL checkpoints in one job.

    torchrun --nproc-per-node N tests/embed_gme.py SPEC.json

SPEC: {"tp": N, "out_dir": DIR, "items": [{"text": ..., "image": PNG path, "instruction": ...}],
       "bad_items": [same, each one a request that must be refused],
       "models": [{"name": ..., "flags": [...], "alone": bool, "items": [indices] (default all)}]}.
Rank 0 writes, per model, DIR/NAME.npy (all items in one `embed_items` call, L2-normalized),
DIR/NAME.alone.npy (each item in a call of its own) when asked, DIR/NAME.prepared.json (each item's
token ids, [3, T] positions and image grid as the processor made them) and DIR/NAME.batches.json (the
sequences and images of every batch the call sent) and DIR/NAME.errors.json (the error each bad item
got, [type, message], asked alone after the others; the job goes on, so nothing was broadcast for
it). Every rank writes DIR/NAME.rank{R}.json with what
the loader read.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import EngineConfig
from tp_embed.distributed import destroy_distributed, exit_process
from tp_embed.engine import Engine
from tp_embed.items import Item


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    out_dir = spec["out_dir"]
    def item(i: dict) -> Item:
        return Item(text=i.get("text"), image=Image.open(i["image"]).convert("RGB") if i.get("image") else None,
                    instruction=i.get("instruction"))

    items = [item(i) for i in spec["items"]]
    bad_items = [item(i) for i in spec.get("bad_items", [])]
    for model in spec["models"]:
        p = argparse.ArgumentParser()
        add_engine_args(p)
        args = parse_with_config(p, ["--tp", str(spec["tp"])] + model["flags"])
        engine = Engine(EngineConfig.from_args(args), show_progress=False)
        name = os.path.join(out_dir, model["name"])
        with open(f"{name}.rank{engine.dist.tp_rank}.json", "w") as f:
            json.dump(engine.load_stats, f)
        if not engine.is_driver:
            engine.worker_loop()
            continue
        model_items = [items[i] for i in model.get("items", range(len(items)))]
        batches = []
        forward_batch = engine.forward_batch

        def recording_forward_batch(batch):
            batches.append({"num_seqs": batch.num_seqs, "num_images": batch.num_images})
            return forward_batch(batch)

        engine.forward_batch = recording_forward_batch
        np.save(f"{name}.npy", F.normalize(engine.embed_items(model_items), dim=-1).numpy())
        with open(f"{name}.batches.json", "w") as f:
            json.dump(batches, f)
        if model.get("alone"):
            alone = torch.cat([engine.embed_items([item]) for item in model_items])
            np.save(f"{name}.alone.npy", F.normalize(alone, dim=-1).numpy())
        prepared = [engine.processor.prepare(item) for item in model_items]
        with open(f"{name}.prepared.json", "w") as f:
            json.dump([{"input_ids": p.input_ids, "positions": p.positions.tolist(), "grid_thw": p.grid_thw}
                       for p in prepared], f)
        errors = []
        for bad in bad_items:
            try:
                engine.embed_items([items[0], bad])
                errors.append(None)
            except ValueError as e:
                errors.append([type(e).__name__, str(e)])
        with open(f"{name}.errors.json", "w") as f:
            json.dump(errors, f)
        engine.stop_workers()
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)
