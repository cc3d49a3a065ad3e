"""A tiny RANDOM CLIPModel checkpoint, built locally, and transformers' reference vectors for it.

`make_clip(path)` writes what openai/clip-vit-* ships, in miniature:

    config.json + model.safetensors   CLIPModel: text hidden 64, 4 heads, 2 layers, 77 positions;
                                      vision hidden 96, 8 heads, 2 layers, 32x32 images in 8x8 patches;
                                      projection_dim 48; quick_gelu; weights ~ N(0, 0.2) (tiny_models)
    tokenizer.json, tokenizer_config.json
                                      CLIPTokenizer: CLIP's normalizer and byte-level pre-tokenizer, a BPE
                                      with 300 merges learned here from tiny_models' corpus, <bos> a <eos>
    preprocessor_config.json          the legacy openai form: size 32 (shortest edge), crop_size 32,
                                      bicubic, CLIP mean/std

Two pooling conventions, both in transformers' CLIPTextTransformer:
  legacy=True  (the OpenAI checkpoints): config eos_token_id = 2, the special tokens END the vocabulary, so
               the EOS is the largest id and transformers pools at the argmax of the ids.
  legacy=False: the special tokens START the vocabulary (<|startoftext|> = 0, <|endoftext|> = 1) and the
               config says eos_token_id = 1: transformers pools at the first EOS. Here the argmax rule
               would pick a random token, and on the legacy model a "first id 2" rule would too, so each
               checkpoint catches an implementation that follows the other's rule.
The vocabulary (814 entries) is not a multiple of 4, to exercise vocab-parallel padding.
"""

import json
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image

import tiny_models as tm

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
IMAGE_SIZE = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _learn_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself, so the
    result is the same in every process)."""
    words = {tuple(w): c for w, c in words.items()}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def build_clip_tokenizer(legacy: bool = True, num_merges: int = 300):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    base = byte_chars + [c + "</w>" for c in byte_chars]
    # CLIP's own normalizer and pre-tokenizer cut the corpus into words
    bare = CLIPTokenizer(vocab={BOS: 0, EOS: 1, **{t: i + 2 for i, t in enumerate(base)}}, merges=[])
    backend = bare.backend_tokenizer
    words = Counter()
    for line in tm._training_corpus():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1
    merges = _learn_merges(words, num_merges)
    tokens = base + list(dict.fromkeys(a + b for a, b in merges))
    tokens = tokens + [BOS, EOS] if legacy else [BOS, EOS] + tokens
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)
    return tok


def make_clip(path: str, legacy: bool = True, seed: int = 0, std: float = tm.DEFAULT_STD) -> str:
    from transformers import CLIPConfig, CLIPModel

    tok = build_clip_tokenizer(legacy)
    eos_id, bos_id = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(BOS)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=bos_id, eos_token_id=2 if legacy else eos_id, pad_token_id=eos_id),
        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
                           image_size=IMAGE_SIZE, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=48)
    model = CLIPModel(config)
    tm._randomize(model, seed, std)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN,
                   "image_std": CLIP_STD, "resample": 3, "size": IMAGE_SIZE}, f, indent=2)
    return path


def make_images() -> dict[str, Image.Image]:
    """Deterministic test images of several shapes and modes (resize and crop both matter)."""
    rng = np.random.RandomState(0)
    noise = lambda h, w, c: rng.randint(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    ramp = np.linspace(0, 255, 60 * 45, dtype=np.float64).reshape(45, 60)
    return {
        "wide": Image.fromarray(noise(40, 100, 3)),
        "tall": Image.fromarray(noise(64, 40, 3)),
        "square": Image.fromarray(noise(32, 32, 3)),
        "gray": Image.fromarray(ramp.astype(np.uint8), mode="L"),
        "rgba": Image.fromarray(noise(50, 36, 4), mode="RGBA"),
    }


def reference_text(path: str, texts: list[str], truncate: bool = False) -> np.ndarray:
    """transformers' get_text_features, L2-normalized, float32 [len(texts), projection_dim]."""
    from transformers import AutoTokenizer, CLIPModel

    tok = AutoTokenizer.from_pretrained(path)
    model = CLIPModel.from_pretrained(path, attn_implementation="eager").eval()
    enc = tok(texts, padding=True, truncation=truncate, max_length=77 if truncate else None, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def reference_images(path: str, images: list) -> np.ndarray:
    """transformers' CLIP preprocessing (PIL backend) and get_image_features, L2-normalized."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    pixels = CLIPImageProcessorPil.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    model = CLIPModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels).pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()
