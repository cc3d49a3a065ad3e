"""Every preset (tp_embed/configs/, `configs/` in a checkout) parses as flags, its stated tp choices are the ones
the engine accepts, and presets resolve by name from anywhere and ship in the wheel."""

import argparse
import glob
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tp_embed.args import add_engine_args, parse_with_config, preset_names, preset_path
from tp_embed.config import ConfigError
from tp_embed.models import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "tp_embed", "configs", "*.json")))


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


def test_presets_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    """A name (with or without .json, or as configs/NAME.json) finds the packaged preset from any directory;
    a path still works; an unknown name is an error that lists the presets."""
    monkeypatch.chdir(tmp_path)
    p = argparse.ArgumentParser()
    add_engine_args(p)
    for spelling in ("e5-mistral-7b-instruct", "e5-mistral-7b-instruct.json", "configs/e5-mistral-7b-instruct.json"):
        assert parse_with_config(p, ["--config", spelling]).model_path == "intfloat/e5-mistral-7b-instruct"
    own = tmp_path / "mine.json"
    own.write_text('{"model-path": "/models/mine", "pooling": "mean"}')
    assert parse_with_config(p, ["--config", str(own)]).model_path == "/models/mine"
    assert preset_path("elsewhere/bge-m3.json") is None  # a path that is not there is not read as a name
    with pytest.raises(SystemExit) as e:
        parse_with_config(p, ["--config", "e5-mistral"])
    assert e.value.code == 2


def test_list_configs_names_every_preset():
    done = subprocess.run([sys.executable, "-m", "tp_embed", "--list-configs"], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert listed == preset_names() == sorted(os.path.basename(p)[:-5] for p in PRESETS)
    assert "intfloat/e5-mistral-7b-instruct" in done.stdout


def test_the_wheel_ships_the_presets(tmp_path):
    """Installed from a wheel, not a checkout, the presets are there: the package data names them."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(next(tmp_path.glob("tp_embed-*.whl"))) as wheel:
        shipped = sorted(n.split("/")[-1][:-5] for n in wheel.namelist() if n.startswith("tp_embed/configs/"))
    assert shipped == preset_names()
