"""Snapshot every model family's vectors, to check that a refactor leaves them bit for bit unchanged.

    python tests/snapshot_vectors.py --out DIR --tp 1,2      # embed, writing DIR/tp{N}/NAME.npy
    python tests/snapshot_vectors.py --compare DIR_A DIR_B   # max abs difference per file; exit 1 unless all 0

Builds the tests' tiny random checkpoints with fixed seeds (tests/tiny_models.py, tests/tiny_clip.py and
tests/test_gme.py's make_qwen2_vl) plus the embedded all-MiniLM-L6-v2, and embeds fixed texts and images
through the tests' torchrun harness scripts (tests/embed_models.py, embed_items.py, embed_gme.py) on the
CPU in float32, the way the model tests do, with the "alone" (and CLIP's small-batch, truncated and
text-route) variants. Everything it uses is found relative to this file, so a copy of it in another
checkout snapshots that checkout.
"""

import argparse
import base64
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
SEED = 0
EXTRA_TEXTS = ["", "emoji 🚀🔥 and symbols ∑∫√", "这是一个中文句子。"]  # + LONG_TEXT: --truncate cuts it
CLIP_TEXTS = ["hello", "a photo of a cat", "", "hello world <|endoftext|> again",
              "The quick brown fox jumps over the lazy dog.", "naïve café, Zürich 🍕",
              ("Tensor parallelism splits every weight matrix across several GPUs, and an all reduce sums the "
               "partial results of every rank."), "A B C"]


def text_job(tm, root: str) -> tuple[list[str], list[dict]]:
    """The decoder and encoder families (and MiniLM) for tests/embed_models.py: (texts, model specs)."""
    def at(name):
        return os.path.join(root, name)
    ck = {"mistral": tm.make_mistral(at("mistral"), SEED, num_key_value_heads=2),
          "mistral_sharded": tm.make_mistral(at("mistral_sharded"), SEED, max_shard_size="20KB", legacy_config=True),
          "qwen2": tm.make_qwen2_bidirectional(at("qwen2"), SEED),
          "qwen3": tm.make_qwen3(at("qwen3"), SEED),
          "bert": tm.make_bert(at("bert"), seed=SEED),
          "bert_prefixed": tm.make_bert(at("bert_prefixed"), seed=SEED, with_prefix=True),
          "xlmr": tm.make_xlm_roberta(at("xlmr"), seed=SEED),
          "xlmr_prefixed": tm.make_xlm_roberta(at("xlmr_prefixed"), seed=SEED, with_prefix=True)}
    models = [{"name": name, "flags": ["--model-path", path], "alone": True} for name, path in ck.items()]
    models += [
        {"name": "mistral_query", "flags": ["--model-path", ck["mistral"], "--prompt-name", "query"]},
        {"name": "qwen2_forced_causal",
         "flags": ["--model-path", ck["qwen2"], "--json-model-override-args", '{"is_causal": true}']},
        {"name": "qwen3_dim16", "flags": ["--model-path", ck["qwen3"], "--json-model-override-args",
                                          '{"matryoshka_dimensions": [16, 32]}', "--dimensions", "16"]},
        {"name": "minilm", "flags": [], "alone": True},  # no --model-path: the embedded default
    ]
    for m in models:
        m["flags"] = m["flags"] + ["--truncate"]
    return tm.MIXED_TEXTS + EXTRA_TEXTS + [tm.LONG_TEXT], models


def clip_spec(tm, tc, root: str) -> dict:
    """Both CLIP layouts for tests/embed_items.py, texts and images interleaved as tests/test_clip.py names them."""
    media = os.path.join(root, "media")
    os.makedirs(os.path.join(media, "sub"))
    images = tc.make_images()
    images["tall"].save(os.path.join(media, "tall.jpg"), quality=90)
    images["square"].save(os.path.join(media, "sub", "square.png"))

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    refs = ["data:image/png;base64," + b64(images["wide"]), "file://" + os.path.join(media, "tall.jpg"),
            b64(images["gray"]), os.path.join(media, "sub", "square.png"),
            "data:image/png;base64," + b64(images["rgba"])]
    items = []
    for i, text in enumerate(CLIP_TEXTS):
        items += [{"text": text}] + ([{"image": refs[i]}] if i < len(refs) else [])
    models = [{"name": f"clip_{name}", "items": items, "alone": True, "small_batches": True,
               "flags": ["--model-path", tc.make_clip(os.path.join(root, f"clip_{name}"), legacy=legacy, seed=SEED)],
               "truncate_items": [{"text": tm.LONG_TEXT}, {"text": "short"}]}
              for name, legacy in (("legacy", True), ("modern", False))]
    return {"models": models, "media": {"allowed_local_path": media}}


def gme_spec(root: str) -> dict:
    """Both Qwen2-VL layouts for tests/embed_gme.py, with tests/test_gme.py's items and images."""
    from PIL import Image

    import test_gme as tg

    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in tg.IMAGES.items():
        paths[name] = os.path.join(root, f"{name}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(paths[name])
    items = [{**item, "image": paths[item["image"]]} if "image" in item else item for item in tg.ITEMS]
    ck = {layout: tg.make_qwen2_vl(os.path.join(root, f"gme_{layout}"), layout, seed=SEED)
          for layout in ("legacy", "v5")}
    models = [{"name": f"gme_{layout}", "alone": True,
               "flags": ["--model-path", path, "--chat-template", "gme-qwen2-vl"] + tg.pixel_flags()}
              for layout, path in ck.items()]
    models += [{"name": "gme_pixels", "alone": True,
                "flags": ["--model-path", ck["legacy"], "--chat-template", "gme-qwen2-vl"]},
               {"name": "gme_raw", "alone": True, "items": tg.RAW_ITEMS,
                "flags": ["--model-path", ck["legacy"]] + tg.pixel_flags()}]
    return {"items": items, "models": models}


def snapshot(out: str, tps: list[int]) -> None:
    sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
    import tiny_clip as tc
    import tiny_models as tm
    from dist_utils import embed_models, run, torchrun_cmd

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="snapshot-") as root:
        texts, text_models = text_job(tm, os.path.join(root, "ckpt"))
        jobs = {"embed_items.py": clip_spec(tm, tc, os.path.join(root, "ckpt")),
                "embed_gme.py": gme_spec(os.path.join(root, "ckpt"))}
        print(f"checkpoints built in {time.time() - start:.0f} s", flush=True)
        for tp in tps:
            work, dest = os.path.join(root, f"tp{tp}"), os.path.join(out, f"tp{tp}")
            t0 = time.time()
            embed_models(tp, work, texts, text_models)
            for script, spec in jobs.items():
                with open(os.path.join(work, "spec.json"), "w") as f:
                    json.dump({"tp": tp, "out_dir": work, **spec}, f)
                proc = run(torchrun_cmd(tp, os.path.join(TESTS, script), os.path.join(work, "spec.json")))
                if proc.returncode != 0:
                    sys.exit(f"{script} at tp={tp} failed:\n{proc.stderr[-4000:]}")
            os.makedirs(dest, exist_ok=True)
            names = sorted(n for n in os.listdir(work) if n.endswith(".npy"))
            for name in names:
                shutil.copy(os.path.join(work, name), dest)
            print(f"tp={tp}: {len(names)} files in {dest} ({time.time() - t0:.0f} s)", flush=True)
    print(f"done in {time.time() - start:.0f} s")


def npy_files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
            if n.endswith(".npy")}


def compare(dir_a: str, dir_b: str) -> int:
    a, b = npy_files(dir_a), npy_files(dir_b)
    bad = 0
    for name in sorted(a & b):
        x, y = np.load(os.path.join(dir_a, name)), np.load(os.path.join(dir_b, name))
        if x.shape != y.shape:
            print(f"{name}: shapes differ, {x.shape} vs {y.shape}")
            bad += 1
            continue
        diff = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) if x.size else 0.0
        bad += diff != 0  # NaN counts too
        print(f"{name}  {x.shape}  max abs diff {diff:.3g}")
    for name in sorted(a ^ b):
        print(f"{name}: only in {dir_a if name in a else dir_b}")
    print(f"{len(a & b)} files compared, {bad} differ, {len(a ^ b)} missing from one side")
    return 1 if bad or a ^ b or not a & b else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", metavar="DIR", help="embed everything and write DIR/tp{N}/NAME.npy")
    mode.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                      help="compare two snapshots: exit 1 if any vector differs or a file is on one side only")
    p.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes to run with --out (default 1,2)")
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    snapshot(os.path.abspath(args.out), [int(t) for t in args.tp.split(",")])


if __name__ == "__main__":
    main()
