"""Every preset in configs/ parses as flags, and its stated tp choices are the ones the engine accepts."""

import argparse
import glob
import json
import os

import pytest

from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import ConfigError
from tp_embed.models import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


def test_presets_exist():
    names = {os.path.basename(p)[:-5] for p in PRESETS}
    assert {"e5-mistral-7b-instruct", "gte-Qwen2-7B-instruct", "Qwen3-Embedding-0.6B", "Qwen3-Embedding-4B",
            "Qwen3-Embedding-8B", "bge-large-en-v1.5", "bge-m3", "all-MiniLM-L6-v2", "Qwen3-Reranker-0.6B",
            "Qwen3-Reranker-4B", "Qwen3-Reranker-8B", "bge-reranker-v2-m3", "ms-marco-MiniLM-L-6-v2"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p))
def test_preset_parses(path):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = parse_with_config(p, ["--config", path])
    preset = json.load(open(path))
    if "embed" not in preset.get("_tasks", ["embed"]):
        # cross-encoders and rerankers: their head reads its token, and scores are not vectors to normalize
        assert args.pooling is None and args.normalize is None
        assert set(preset["_tasks"]) <= {"score", "rerank", "classify"}
    else:
        # CLIP pools itself (texts at the end-of-text token, images at the class token): no pooling to set
        assert args.pooling in ("last", "mean", "cls") or preset.get("_architecture") == "CLIPModel"
        assert args.normalize is True
    assert args.model_path == preset["model-path"]
    # the command line wins over the preset
    assert parse_with_config(p, ["--config", path, "--pooling", "mean"]).pooling == "mean"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p))
def test_preset_tp_choices_match_the_engine(path, tmp_path):
    preset = json.load(open(path))
    heads, kv_heads = preset["_attention_heads"]
    config = {"architectures": ["MistralModel"], "model_type": "mistral", "hidden_size": heads * 8,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 1,
              "intermediate_size": 16, "vocab_size": 100}
    if preset.get("_architecture") == "CLIPModel":  # CLIP: tp must divide both towers' heads
        config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 8,
                  "text_config": {"num_attention_heads": heads, "hidden_size": heads * 8, "intermediate_size": 16},
                  "vision_config": {"num_attention_heads": preset["_vision_heads"],
                                    "hidden_size": preset["_vision_heads"] * 8, "intermediate_size": 16}}
    elif "_vision_heads" in preset:  # Qwen2-VL: the vision tower's heads must split too
        text = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "text_config": text,
                  "vision_config": {"num_heads": preset["_vision_heads"], "embed_dim": preset["_vision_heads"] * 8}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    accepted = []
    for tp in range(1, 9):
        try:
            load_config(str(tmp_path), tp_size=tp)
            accepted.append(tp)
        except ConfigError:
            pass
    assert preset["_tp_choices"] == accepted
