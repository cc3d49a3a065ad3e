"""CLIP: tiny random CLIPModel checkpoints at tp = 1, 2 and 4 (gloo, CPU, float32) against transformers'
get_text_features / get_image_features, L2-normalized: cosine >= 0.99999 for every vector.

One torchrun job per tp (tests/embed_items.py) embeds texts and images mixed in one call, the images given
as data URIs, bare base64, file:// URIs and absolute paths under the allowed directory, so they pass
through media.load_image and reach the workers in the protocol's pixel broadcast.
"""

import base64
import io
import json
import os
import types

import numpy as np
import pytest
import torch

import tiny_clip as tc
import tiny_models as tm
from dist_utils import cosines, run, torchrun_cmd
from tp_embed.config import ConfigError, SentenceTransformersConfig
from tp_embed.engine import Engine
from tp_embed.items import Item
from tp_embed.media import MediaConfig, load_image
from tp_embed.models import clip, load_config
from tp_embed.models.clip import ClipProcessor, eos_token_indices
from tp_embed.text import InputTooLongError, TextProcessor

TPS = (1, 2, 4)
BOUND = 0.99999
TEXTS = [
    "hello",
    "a photo of a cat",
    "",  # <|startoftext|> <|endoftext|> only
    "hello world <|endoftext|> again",  # transformers pools at the FIRST end-of-text token
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, Zürich 🍕",
    "Tensor parallelism splits every weight matrix across several GPUs, and an all reduce sums the "
    "partial results of every rank.",
    "A B C",
]
LONG_TEXT = tm.LONG_TEXT  # hundreds of tokens: over CLIP's 77


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    images = tc.make_images()
    images["tall"].save(root / "tall.jpg", quality=90)
    (root / "sub").mkdir()
    images["square"].save(root / "sub" / "square.png")
    return root


@pytest.fixture(scope="module")
def media_cfg(media_dir):
    return MediaConfig(allowed_local_path=str(media_dir))


@pytest.fixture(scope="module")
def item_specs(media_dir):
    """Texts and images interleaved; every way a client can name an image."""
    images = tc.make_images()
    data_uri = lambda im: "data:image/png;base64," + base64.b64encode(png_bytes(im)).decode()  # noqa: E731
    image_refs = [
        data_uri(images["wide"]),
        "file://" + str(media_dir / "tall.jpg"),
        base64.b64encode(png_bytes(images["gray"])).decode(),
        str(media_dir / "sub" / "square.png"),
        data_uri(images["rgba"]),
    ]
    specs = []
    for i, text in enumerate(TEXTS):
        specs.append({"text": text})
        if i < len(image_refs):
            specs.append({"image": image_refs[i]})
    return specs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return {"legacy": tc.make_clip(str(root / "legacy"), legacy=True),
            "modern": tc.make_clip(str(root / "modern"), legacy=False)}


@pytest.fixture(scope="module")
def outputs(checkpoints, item_specs, media_cfg, tmp_path_factory):
    """{tp: output directory} after one torchrun job per tp."""
    image_ref = next(s["image"] for s in item_specs if "image" in s)
    models = [
        {"name": "legacy", "flags": ["--model-path", checkpoints["legacy"]], "items": item_specs,
         "alone": True, "small_batches": True, "truncate_items": [{"text": LONG_TEXT}, {"text": "short"}],
         "bad": {"both": [{"text": "a"}, {"text": "a cat", "image": image_ref}],
                 "too_long": [{"image": image_ref}, {"text": "short"}, {"text": LONG_TEXT}]}},
        {"name": "modern", "flags": ["--model-path", checkpoints["modern"]], "items": item_specs},
    ]
    dirs = {}
    for tp in TPS:
        out = str(tmp_path_factory.mktemp(f"clip_tp{tp}"))
        spec = os.path.join(out, "spec.json")
        with open(spec, "w") as f:
            json.dump({"tp": tp, "out_dir": out, "models": models,
                       "media": {"allowed_local_path": media_cfg.allowed_local_path}}, f)
        proc = run(torchrun_cmd(tp, os.path.join(os.path.dirname(__file__), "embed_items.py"), spec))
        assert proc.returncode == 0, f"embed_items at tp={tp} failed:\n{proc.stderr[-4000:]}"
        dirs[tp] = out
    return dirs


def load(outputs, tp, name, suffix="npy"):
    return np.load(os.path.join(outputs[tp], f"{name}.{suffix}"))


def info(outputs, tp, name):
    with open(os.path.join(outputs[tp], f"{name}.info.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def references(checkpoints, item_specs, media_cfg):
    """transformers' normalized vectors in item order; the images decoded by media.load_image."""
    refs = {}
    for name, path in checkpoints.items():
        texts = [s["text"] for s in item_specs if "text" in s]
        images = [load_image(s["image"], media_cfg) for s in item_specs if "image" in s]
        by_kind = {"text": iter(tc.reference_text(path, texts)), "image": iter(tc.reference_images(path, images))}
        refs[name] = np.stack([next(by_kind["text" if "text" in s else "image"]) for s in item_specs])
    return refs


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", ["legacy", "modern"])
def test_matches_transformers(outputs, references, name, tp):
    ours = load(outputs, tp, name)
    assert ours.shape == references[name].shape == (len(TEXTS) + 5, 48)
    cos = cosines(ours, references[name])
    assert cos.min() >= BOUND, f"{name} tp={tp}: min cosine {cos.min():.7f} at item {cos.argmin()}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_texts_are_packed_at_mixed_lengths(checkpoints):
    from transformers import AutoTokenizer

    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(checkpoints["legacy"])(TEXTS)["input_ids"]]
    assert max(lengths) <= 77 and max(lengths) >= 8 * min(lengths) and len(set(lengths)) >= 6, lengths


@pytest.mark.parametrize("tp", TPS)
def test_alone_and_small_batches_equal_one_batch(outputs, tp):
    batched = load(outputs, tp, "legacy")
    assert cosines(batched, load(outputs, tp, "legacy", "alone.npy")).min() >= BOUND
    assert cosines(batched, load(outputs, tp, "legacy", "small.npy")).min() >= BOUND


@pytest.mark.parametrize("tp", TPS)
def test_text_route_equals_item_route(outputs, item_specs, tp):
    """The server's text-only route (engine.embed of token ids) gives the text items' vectors."""
    is_text = ["text" in s for s in item_specs]
    assert cosines(load(outputs, tp, "legacy", "texts.npy"), load(outputs, tp, "legacy")[is_text]).min() >= BOUND


@pytest.mark.parametrize("tp", TPS)
def test_normalized_by_default(outputs, tp):
    assert info(outputs, tp, "legacy")["normalize"] is True
    assert info(outputs, tp, "legacy")["embedding_size"] == 48


@pytest.mark.parametrize("tp", TPS)
def test_text_and_image_in_one_item_is_refused(outputs, tp):
    message = info(outputs, tp, "legacy")["errors"]["both"]
    assert message is not None and message.startswith("input 1 has both text and an image")
    assert "separately" in message and "GME" in message


@pytest.mark.parametrize("tp", TPS)
def test_too_long_text_names_both_numbers(outputs, checkpoints, tp):
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(checkpoints["legacy"])(LONG_TEXT)["input_ids"])
    message = info(outputs, tp, "legacy")["errors"]["too_long"]
    assert message is not None and f"input 2 has {n} tokens" in message and "77 tokens" in message
    assert "truncat" in message


@pytest.mark.parametrize("tp", TPS)
def test_truncation(outputs, checkpoints, tp):
    ref = tc.reference_text(checkpoints["legacy"], [LONG_TEXT, "short"], truncate=True)
    assert cosines(load(outputs, tp, "legacy", "truncated.npy"), ref).min() >= BOUND


def test_each_checkpoint_catches_the_other_pooling_rule(checkpoints):
    """transformers pools the legacy checkpoint at the largest id and the modern one at the first EOS;
    on each checkpoint the other rule (or, on the legacy one, looking for the config's eos_token_id 2
    itself) picks other tokens, so the model tests above would catch either mistake."""
    from transformers import AutoTokenizer

    def first(seq, token):
        return seq.index(token) if token in seq else 0

    for name in ("legacy", "modern"):
        tok = AutoTokenizer.from_pretrained(checkpoints[name])
        seqs = tok(TEXTS)["input_ids"]
        eos = tok.convert_tokens_to_ids(tc.EOS)
        right = [first(s, eos) for s in seqs]
        if name == "legacy":
            assert right == [first(s, max(s)) for s in seqs]  # its EOS is the largest id
            wrong = [first(s, 2) for s in seqs]
        else:
            wrong = [first(s, max(s)) for s in seqs]
        assert sum(a != b for a, b in zip(right, wrong)) >= len(TEXTS) - 1, name
        # and the engine's index function agrees with transformers' rule
        ids = torch.tensor([t for s in seqs for t in s])
        cu = torch.tensor([0] + np.cumsum([len(s) for s in seqs]).tolist())
        eos_id = 2 if name == "legacy" else eos
        assert (eos_token_indices(ids, cu, max(map(len, seqs)), eos_id) - cu[:-1]).tolist() == right


def test_tp_must_divide_both_towers(tmp_path):
    from transformers import CLIPConfig

    CLIPConfig(text_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64),
               vision_config=dict(hidden_size=48, num_attention_heads=6, intermediate_size=96),
               projection_dim=24, architectures=["CLIPModel"]).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path), tp_size=4, name="clip-test")
    assert str(e.value) == ("tp=4 does not divide the attention heads of clip-test (text tower 4, vision "
                            "tower 6); use tp in {1, 2}")
    spec, cfg = load_config(str(tmp_path), tp_size=2)
    assert spec is clip.SPEC and spec.default_pooling is None  # the towers pool themselves
    assert (cfg.embedding_size, cfg.hidden_size, cfg.max_input_tokens, cfg.causal) == (24, 32, 77, True)


def test_pixels_follow_the_preprocessor_config(checkpoints):
    """Resize the shortest side to 32 (bicubic), center crop 32x32, rescale, normalize: computed here
    with PIL and numpy, against what the processor broadcasts."""
    from PIL import Image

    proc = ClipProcessor(checkpoints["legacy"], load_config(checkpoints["legacy"])[1])
    for name, image in tc.make_images().items():
        image = image.convert("RGB")
        w, h = image.size
        s = tc.IMAGE_SIZE
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        left, top = (nw - s) // 2, (nh - s) // 2
        cropped = image.resize((nw, nh), Image.BICUBIC).crop((left, top, left + s, top + s))
        expected = (np.asarray(cropped, dtype=np.float64) / 255 - tc.CLIP_MEAN) / tc.CLIP_STD
        row = proc.pixel_rows([image])[0].numpy()
        np.testing.assert_allclose(row, expected.transpose(2, 0, 1).reshape(-1), atol=1e-5, err_msg=name)


def test_preprocessor_must_crop_to_the_towers_size(checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(checkpoints["legacy"], tmp_path / "ckpt")
    cfg = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**cfg, "crop_size": 24}))
    with pytest.raises(ConfigError, match="must center-crop to 32x32"):
        ClipProcessor(str(path), load_config(str(path))[1])


class RecordingEngine:
    """Stands in for the engine around `processor` (the engine's own embed_items, prepare_items and
    embed_prepared): records each batch and returns, per text, its token count and, per image, its mean
    pixel, so the reassembled order can be checked."""
    embed_items, prepare_items, embed_prepared = Engine.embed_items, Engine.prepare_items, Engine.embed_prepared

    def __init__(self, processor, text, max_batch_tokens, max_batch_seqs, allow_auto_truncate=False):
        self.processor, self.text = processor, text
        self.max_batch_tokens, self.max_batch_seqs = max_batch_tokens, max_batch_seqs
        self.options = types.SimpleNamespace(allow_auto_truncate=allow_auto_truncate)
        self.embedding_size, self.batches = 2, []

    def forward_batch(self, batch):
        self.batches.append(batch)
        lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).float()
        rows = [torch.stack([lens, torch.zeros_like(lens)], 1)]
        if batch.pixel_values is not None:
            means = batch.pixel_values.mean(1)
            rows.append(torch.stack([torch.zeros_like(means), means], 1))
        return torch.cat(rows)


def test_packing_respects_budgets_and_keeps_item_order(checkpoints):
    path = checkpoints["legacy"]
    cfg = load_config(path)[1]
    text = TextProcessor(path, SentenceTransformersConfig(), cfg.max_input_tokens)
    proc = ClipProcessor(path, cfg)
    proc.max_batch_images = 2
    images = [im.convert("RGB") for im in tc.make_images().values()]
    items = [Item(text=t) for t in TEXTS] + [Item(image=im) for im in images]
    items = items[::2] + items[1::2]
    engine = RecordingEngine(proc, text, max_batch_tokens=60, max_batch_seqs=3)
    out = engine.embed_items(items)
    for batch in engine.batches:
        assert batch.num_tokens + proc.tokens_per_image * batch.num_images <= 60
        assert batch.num_seqs + batch.num_images <= 3 and batch.num_images <= 2
        assert batch.num_images == (0 if batch.pixel_values is None else batch.pixel_values.shape[0])
    for item, vector in zip(items, out):
        if item.text is not None:
            assert vector.tolist() == [len(text.encode([item.text], False)[0]), 0.0]
        else:
            assert vector[1].item() == pytest.approx(proc.pixel_rows([item.image])[0].mean().item(), abs=1e-6)


def test_allow_auto_truncate_is_the_default(checkpoints):
    """Without a per-request choice, --allow-auto-truncate decides: the long text is cut to 77 tokens."""
    path = checkpoints["legacy"]
    cfg = load_config(path)[1]
    text = TextProcessor(path, SentenceTransformersConfig(), cfg.max_input_tokens)
    items = [Item(text="short"), Item(text=LONG_TEXT)]
    with pytest.raises(InputTooLongError, match="input 1 has"):
        RecordingEngine(ClipProcessor(path, cfg), text, 1000, 8).embed_items(items)
    engine = RecordingEngine(ClipProcessor(path, cfg), text, 1000, 8, allow_auto_truncate=True)
    assert engine.embed_items(items)[:, 0].tolist() == [len(text.encode(["short"], False)[0]), 77]


def test_pooling_flag_is_refused(checkpoints, tmp_path):
    """CLIP pools inside its towers: a --pooling the engine would ignore is a startup error, not a silent no-op."""
    (tmp_path / "texts.txt").write_text("a photo of a cat\n")  # read before the model: it must exist
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", checkpoints["legacy"], "--pooling", "mean",
                            "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "y.npy")))
    assert proc.returncode != 0
    assert "--pooling mean does not apply to" in proc.stderr and "leave --pooling out" in proc.stderr
    assert not (tmp_path / "y.npy").exists()


def test_stack_rows_is_a_view_only_for_consecutive_rows_of_one_tensor():
    from tp_embed.models.clip import stack_rows
    base, other = torch.randn(5, 12), torch.randn(2, 12)
    rows = list(base)
    for picked in (rows, rows[1:4], rows[3:4]):  # one request's images, in order: no copy
        got = stack_rows(picked)
        assert got.data_ptr() == picked[0].data_ptr() and torch.equal(got, torch.stack(picked))
    for picked in ([rows[0], rows[2]], [rows[4], other[0]], [rows[1], rows[0]]):  # gaps, two tensors, reordered
        got = stack_rows(picked)
        assert got.data_ptr() not in (base.data_ptr(), other.data_ptr()) and torch.equal(got, torch.stack(picked))
