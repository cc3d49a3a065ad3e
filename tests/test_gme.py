"""GME (Qwen2-VL) against transformers: a tiny random Qwen2VLForConditionalGeneration, text-only,
image-only and fused items at tp = 1 and 2 (gloo, CPU, float32), both checkpoint layouts.

The reference is transformers' Qwen2VLModel run on the prompt this file writes out (GME's template),
with the image pads expanded as Qwen2VLProcessor expands them, and on the pixels of transformers'
Qwen2VLImageProcessorPil: the last hidden state at the final token, L2-normalized. One torchrun job per
tp embeds everything (tests/embed_gme.py); the tests read its outputs.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

import tiny_models as tm
from dist_utils import ROOT, cosines, run, torchrun_cmd
from tp_embed.config import ConfigError
from tp_embed.items import Item
from tp_embed.models import load_config, qwen2_vl
from tp_embed.models.qwen2_vl import render

TPS = (1, 2)
BOUND = 0.99999  # the issue asks 0.9999; float32 gives 1 - cos ~ 1e-11
# small images keep the test fast; GME's own bounds (256 to 1280 image tokens) get one model below
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64
GME_MIN_PIXELS, GME_MAX_PIXELS = 256 * 28 * 28, 1280 * 28 * 28
QUERY_INSTRUCTION = "Find an image that matches the given text."
# (height, width): two aspect ratios, one rounded down to a multiple of 28, one downscaled past MAX_PIXELS
IMAGES = {"wide": (56, 84), "tall": (150, 100), "small": (45, 70), "large": (300, 400)}
ITEMS = [
    {"text": "What is the capital of France?"},
    {"image": "wide"},
    {"image": "tall"},
    {"image": "small", "text": "A photo of a small cat."},
    {"image": "large", "text": "Tensor parallelism splits every weight matrix."},
    {"text": "The quick brown fox jumps over the lazy dog.", "instruction": QUERY_INSTRUCTION},
    {"image": "wide", "instruction": QUERY_INSTRUCTION},
    {"text": "hello"},
]
IMAGE_ITEMS = [i for i, item in enumerate(ITEMS) if "image" in item]
BAD_ITEMS = [
    {"text": "a literal <|image_pad|> in the text"},
    {"image": "thin"},  # aspect ratio 225
    {"text": "hello " * 3000},  # past the tokenizer's 2048
]
RAW_ITEMS = [i for i, item in enumerate(ITEMS) if "instruction" not in item]  # no template, no instruction


def gme_prompt(item: dict) -> str:
    """GME's template as its reference (gme_inference.py) writes it."""
    x = ("<|vision_start|><|image_pad|><|vision_end|>" if "image" in item else "") + item.get("text", "")
    instruction = item.get("instruction", "You are a helpful assistant.")
    return (f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{x}<|im_end|>\n"
            f"<|im_start|>assistant\n<|endoftext|>")


def make_qwen2_vl(path: str, layout: str = "legacy", seed: int = 0, vision_heads: int = 4) -> str:
    """Tiny Qwen2VLForConditionalGeneration (text: 2 layers, hidden 64, 4 heads / 2 KV heads of dim 16,
    mrope_section [2, 3, 3]; vision: 2 blocks, embed 64, `vision_heads` heads) with weights drawn at
    std 0.2, and a tokenizer with Qwen2-VL's special tokens.

    layout "legacy": config.json flat (text keys at the top, rope_scaling {"type": "mrope"}) and keys
    visual.* / model.*, as GME ships them (transformers 5's save_pretrained still writes these keys).
    layout "v5": config.json with text_config, keys model.visual.* / model.language_model.*.
    """
    from safetensors.torch import load_file, save_file

    tokenizer = tm.build_decoder_tokenizer(append_eos=False, model_max_length=2048)
    tokenizer.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                         special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=tm.DECODER_VOCAB_SIZE, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=None,
                         eos_token_id=token_id("<|endoftext|>"), pad_token_id=token_id("<|endoftext|>"),
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=vision_heads, mlp_ratio=2),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    tm._randomize(model, seed, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    assert any(k.startswith("visual.") for k in state) and any(k.startswith("model.layers.") for k in state)
    if layout == "legacy":
        text = cfg.pop("text_config")
        text.pop("model_type")
        rope = text.pop("rope_parameters")
        cfg.update(text, rope_theta=rope["rope_theta"], torch_dtype=cfg.pop("dtype"),
                   rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    else:
        state = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)
                  if k.startswith("model.") else k): v for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
    json.dump(cfg, open(cfg_file, "w"), indent=2)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in {**IMAGES, "thin": (2, 450)}.items():
        paths[name] = str(root / f"{name}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {layout: make_qwen2_vl(str(root / layout), layout) for layout in ("legacy", "v5")}


def pixel_flags(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    return ["--min-pixels", str(min_pixels), "--max-pixels", str(max_pixels)]


@pytest.fixture(scope="module")
def outputs(checkpoints, images, tmp_path_factory):
    """{tp: output directory} after one torchrun job per tp."""
    def with_paths(items):
        return [{**item, "image": images[item["image"]]} if "image" in item else item for item in items]
    dirs = {}
    for tp in TPS:
        models = [{"name": layout, "alone": layout == "legacy",
                   "flags": ["--model-path", path, "--chat-template", "gme-qwen2-vl"] + pixel_flags()}
                  for layout, path in checkpoints.items()]
        if tp == 1:
            models += [
                {"name": "gme_pixels", "flags": ["--model-path", checkpoints["legacy"], "--chat-template",
                                                 "gme-qwen2-vl"]},
                {"name": "raw", "items": RAW_ITEMS, "flags": ["--model-path", checkpoints["legacy"]] + pixel_flags()},
            ]
        out = str(tmp_path_factory.mktemp(f"tp{tp}"))
        spec = os.path.join(out, "spec.json")
        json.dump({"tp": tp, "out_dir": out, "items": with_paths(ITEMS), "bad_items": with_paths(BAD_ITEMS),
                   "models": models}, open(spec, "w"))
        proc = run(torchrun_cmd(tp, os.path.join(ROOT, "tests", "embed_gme.py"), spec))
        assert proc.returncode == 0, f"embed_gme at tp={tp} failed:\n{proc.stderr[-4000:]}"
        dirs[tp] = out
    return dirs


def reference(path: str, images: dict, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, template=True) -> dict:
    """transformers on every item (RAW_ITEMS without the template): {"vectors": [n, hidden],
    "input_ids": [...], "positions": [...], "grid_thw": [...]}."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = {"vectors": [], "input_ids": [], "positions": [], "grid_thw": []}
    for item in ITEMS if template else [ITEMS[i] for i in RAW_ITEMS]:
        prompt = gme_prompt(item) if template else \
            ("<|vision_start|><|image_pad|><|vision_end|>" if "image" in item else "") + item.get("text", "")
        kwargs, grid = {}, None
        if "image" in item:
            pixels = image_processor(images=[Image.open(images[item["image"]]).convert("RGB")], return_tensors="pt")
            grid = pixels["image_grid_thw"]
            prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4))  # as Qwen2VLProcessor
            kwargs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": grid}
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        mm_token_type_ids = (input_ids == model.config.image_token_id).int()
        with torch.no_grad():
            hidden = model.model(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, **kwargs).last_hidden_state
            positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids, grid)
        out["vectors"].append(torch.nn.functional.normalize(hidden[0, -1], dim=-1))
        out["input_ids"].append(input_ids[0].tolist())
        out["positions"].append(positions[:, 0].tolist())
        out["grid_thw"].append(None if grid is None else grid[0].tolist())
    out["vectors"] = torch.stack(out["vectors"]).numpy()
    return out


@pytest.fixture(scope="module")
def references(checkpoints, images):
    return {"legacy": reference(checkpoints["legacy"], images), "v5": reference(checkpoints["v5"], images),
            "gme_pixels": reference(checkpoints["legacy"], images, GME_MIN_PIXELS, GME_MAX_PIXELS),
            "raw": reference(checkpoints["legacy"], images, template=False)}


def load(outputs, tp, name, suffix="npy"):
    path = os.path.join(outputs[tp], f"{name}.{suffix}")
    return np.load(path) if suffix.endswith("npy") else json.load(open(path))


def test_rendered_prompts_byte_for_byte():
    image = Image.new("RGB", (28, 28))
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    end = "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    assert render(Item(text="a cat"), "gme-qwen2-vl") == system + "a cat" + end
    assert render(Item(image=image), "gme-qwen2-vl") == \
        system + "<|vision_start|><|image_pad|><|vision_end|>" + end
    assert render(Item(text="a cat", image=image), "gme-qwen2-vl") == \
        system + "<|vision_start|><|image_pad|><|vision_end|>a cat" + end
    assert render(Item(text="a cat", instruction=QUERY_INSTRUCTION), "gme-qwen2-vl") == (
        "<|im_start|>system\nFind an image that matches the given text.<|im_end|>\n"
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")
    # the test's own template (used for the transformers reference) says the same
    for item in ITEMS:
        kwargs = {k: image if k == "image" else v for k, v in item.items()}
        assert render(Item(**kwargs), "gme-qwen2-vl") == gme_prompt(item)
    # without --chat-template: the item alone, and no place for an instruction
    assert render(Item(text="a cat", image=image), None) == "<|vision_start|><|image_pad|><|vision_end|>a cat"
    with pytest.raises(ValueError, match="--chat-template gme-qwen2-vl"):
        render(Item(text="a cat", instruction=QUERY_INSTRUCTION), None)


@pytest.mark.parametrize("name", ["legacy", "v5", "gme_pixels", "raw"])
def test_token_ids_positions_and_grids_match_transformers(outputs, references, name):
    """The expanded prompt tokenizes as Qwen2VLProcessor's, and the [3, T] positions are
    transformers' get_rope_index (text counts up; image tokens at (s, s + row, s + col))."""
    prepared = load(outputs, 1, name, "prepared.json")
    ref = references[name]
    for i, p in enumerate(prepared):
        assert p["input_ids"] == ref["input_ids"][i], f"item {i}"
        assert p["positions"] == ref["positions"][i], f"item {i}"
        assert p["grid_thw"] == ref["grid_thw"][i], f"item {i}"


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("layout", ["legacy", "v5"])
def test_matches_transformers(outputs, references, layout, tp):
    ours = load(outputs, tp, layout)
    cos = cosines(ours, references[layout]["vectors"])
    assert cos.min() >= BOUND, f"{layout} tp={tp}: min cosine {cos.min():.7f} at item {cos.argmin()}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_both_layouts_are_the_same_model(references):
    assert cosines(references["legacy"]["vectors"], references["v5"]["vectors"]).min() >= 0.999999


@pytest.mark.parametrize("name", ["gme_pixels", "raw"])
def test_gme_pixel_bounds_and_raw_prompts(outputs, references, name):
    """Default --min-pixels/--max-pixels are GME's 256*28*28 and 1280*28*28; without --chat-template the
    item is embedded as it is."""
    cos = cosines(load(outputs, 1, name), references[name]["vectors"])
    assert cos.min() >= BOUND, f"{name}: min cosine {cos.min():.7f} at item {cos.argmin()}"
    if name == "gme_pixels":
        tokens = [np.prod(g) // 4 for g in (references[name]["grid_thw"][i] for i in IMAGE_ITEMS)]
        assert min(tokens) >= 256 and max(tokens) <= 1280


def test_two_images_of_different_sizes_in_one_request(outputs, references):
    """All items went through one batch with every image; each image kept its own grid (positions and
    vision cu_seqlens per image), and each image item matches transformers run on it alone."""
    batches = load(outputs, 2, "legacy", "batches.json")
    assert batches == [{"num_seqs": len(ITEMS), "num_images": len(IMAGE_ITEMS)}]
    grids = {tuple(references["legacy"]["grid_thw"][i]) for i in IMAGE_ITEMS}
    assert {(1, 4, 6), (1, 10, 8)} <= grids, grids  # wide and tall
    for tp in TPS:
        cos = cosines(load(outputs, tp, "legacy")[IMAGE_ITEMS], references["legacy"]["vectors"][IMAGE_ITEMS])
        assert cos.min() >= BOUND
    # the images matter: the two image-only items differ from each other
    vectors = load(outputs, 1, "legacy")
    assert cosines(vectors[[1]], vectors[[2]])[0] < 0.99


@pytest.mark.parametrize("tp", TPS)
def test_alone_equals_in_batch(outputs, tp):
    assert cosines(load(outputs, tp, "legacy"), load(outputs, tp, "legacy", "alone.npy")).min() >= 0.99999


def test_instruction_changes_the_vector(outputs):
    vectors = load(outputs, 1, "legacy")
    # items 1 and 6 are the same image, with the default and with the query instruction
    assert cosines(vectors[[1]], vectors[[6]])[0] < 0.99


def test_tp2_reads_half_of_the_vision_tower(outputs):
    for rank in range(2):
        fractions = load(outputs, 2, f"legacy.rank{rank}", "json")["largest_read_fraction"]
        sharded = {n: f for n, f in fractions.items() if n.startswith("visual.")
                   and n.endswith(("qkv.weight", "qkv.bias", "fc1.weight", "fc2.weight", "attn.proj.weight",
                                   "mlp.0.weight", "mlp.2.weight"))}
        assert len(sharded) == 2 * 5 + 2
        assert max(sharded.values()) <= 0.5, sharded


def test_tp_must_split_text_and_vision_heads(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match=r"tp=3 does not divide num_attention_heads=4 .* use tp in \{1, 2, 4\}"):
        load_config(checkpoints["legacy"], tp_size=3)
    spec, cfg = load_config(checkpoints["v5"], tp_size=2)
    assert spec is qwen2_vl.SPEC and (cfg.num_local_heads, cfg.num_local_kv_heads, cfg.qkv_bias) == (2, 1, True)
    # a vision tower with 2 heads: tp=4 fits the text side (4 heads, 2 KV heads) but not the vision side
    config = json.load(open(os.path.join(checkpoints["v5"], "config.json")))
    config["vision_config"].update(num_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"tp=4 does not divide the vision tower's num_heads=2 .* "
                                          r"use tp in \{1, 2\}"):
        load_config(str(tmp_path), tp_size=4)


@pytest.mark.parametrize("tp", TPS)
def test_bad_items_are_refused_on_rank0(outputs, tp):
    """Refused before anything is broadcast (the job goes on with the next model), naming the item."""
    errors = load(outputs, tp, "legacy", "errors.json")
    assert errors[0] == ["ValueError", "item 1: the text or instruction contains the image placeholder <|image_pad|>"]
    assert errors[1][0] == "ValueError" and errors[1][1].startswith("item 1: ") and "aspect ratio" in errors[1][1]
    assert errors[2][0] == "InputTooLongError" and "input 1 has" in errors[2][1] and "2048 tokens" in errors[2][1]
