"""Startup problems the user can fix are reported in words, naming what to change."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from dist_utils import run, torchrun_cmd
from tp_embed.config import ConfigError
from tp_embed.layers.attention import FlashInferAttention, select_attention
from tp_embed.models import load_config
from tp_embed.pooling import MatryoshkaError, check_dimensions


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return tm.make_mistral(str(tmp_path_factory.mktemp("m") / "mistral"))


@pytest.fixture(scope="module")
def io_args(tmp_path_factory):
    """--input and --output for the offline runs below: an input file that exists (the offline entry point
    reads it before the model, so a missing one would be the error reported)."""
    d = tmp_path_factory.mktemp("io")
    (d / "texts.txt").write_text("hello\n")
    return ["--input", str(d / "texts.txt"), "--output", str(d / "out.npy")]


def test_tp_that_does_not_divide_heads_names_valid_values(mistral):
    with pytest.raises(ConfigError) as e:
        load_config(mistral, tp_size=3, name="tiny-mistral")
    assert str(e.value) == ("tp=3 does not divide num_attention_heads=8 of tiny-mistral; use tp in {1, 2, 4, 8}")


def test_tp_that_does_not_fit_kv_heads(tmp_path):
    path = tm.make_mistral(str(tmp_path / "m"), num_attention_heads=12, num_key_value_heads=4, hidden_size=96)
    with pytest.raises(ConfigError, match=r"tp=6 does not fit num_key_value_heads=4 of m; use tp in \{1, 2, 4, 12\}"):
        load_config(path, tp_size=6, name="m")


def test_unsupported_architecture_lists_supported(tmp_path, mistral):
    cfg = json.load(open(os.path.join(mistral, "config.json")))
    cfg["architectures"] = ["MistralForTokenClassification"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path), name="x")
    msg = str(e.value)
    assert "unsupported architecture ['MistralForTokenClassification']" in msg
    for arch in ("MistralModel", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "BertModel", "XLMRobertaModel",
                 "MistralForSequenceClassification", "BertForSequenceClassification", "MPNetForMaskedLM",
                 "ModernBertModel", "Gemma2Model", "Gemma3TextModel"):
        assert arch in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(str(tmp_path))


def test_missing_weight_is_named(tmp_path, mistral):
    import shutil
    path = str(tmp_path / "broken")
    shutil.copytree(mistral, path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, os.path.join(path, "model.safetensors"))
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", path, "--input", __file__,
                            "--output", str(tmp_path / "x.npy")))
    assert proc.returncode != 0
    assert "the checkpoint lacks weights the model needs: layers.1.mlp.down_proj.weight" in proc.stderr


def test_no_weights_at_all(tmp_path, mistral):
    import shutil
    path = str(tmp_path / "noweights")
    shutil.copytree(mistral, path)
    os.remove(os.path.join(path, "model.safetensors"))
    from tp_embed.loader import checkpoint_files
    with pytest.raises(ConfigError, match="holds no .safetensors weights"):
        checkpoint_files(path)


def test_missing_model_directory_offline(io_args):
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", "/nonexistent/model", *io_args))
    assert proc.returncode != 0
    assert "--model-path /nonexistent/model: no such directory" in proc.stderr


def test_hub_id_offline_is_a_clear_error(io_args):
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", "no-such-org/no-such-model",
                            *io_args))
    assert proc.returncode != 0
    assert "not a local directory, and downloading it from the Hugging Face Hub failed" in proc.stderr


def test_tp_must_match_process_count(mistral, io_args):
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", mistral, "--tp", "2",
                            *io_args))
    assert proc.returncode != 0
    assert "--tp 2 needs exactly 2 processes, but torchrun started 1" in proc.stderr


def test_tp_error_at_startup_under_torchrun(mistral, io_args):
    proc = run(torchrun_cmd(3, "-m", "tp_embed.offline", "--model-path", mistral, "--tp", "3",
                            *io_args))
    assert proc.returncode != 0
    assert "tp=3 does not divide num_attention_heads=8" in proc.stderr


@pytest.mark.parametrize("dims,hidden,listed,is_m,message", [
    (0, 64, None, True, "dimensions must be between 1 and 64, got 0"),
    (65, 64, None, True, "dimensions must be between 1 and 64, got 65"),
    (24, 64, [16, 32], False, "dimensions 24 is not supported by this model; supported: [16, 32]"),
    (16, 64, None, False, "this model does not support Matryoshka dimensions"),
    ("16", 64, None, True, "dimensions must be an integer, got '16'"),
])
def test_invalid_matryoshka_dimensions(dims, hidden, listed, is_m, message):
    with pytest.raises(MatryoshkaError) as e:
        check_dimensions(dims, hidden, listed, is_m)
    assert message in str(e.value)


def test_valid_matryoshka_dimensions():
    check_dimensions(None, 64, None, False)
    check_dimensions(64, 64, None, False)
    check_dimensions(1, 64, None, True)
    check_dimensions(32, 64, [16, 32], False)


def test_offline_rejects_bad_dimensions(mistral, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", mistral, "--input", str(texts),
                            "--output", str(tmp_path / "o.npy"), "--dimensions", "24",
                            "--json-model-override-args", '{"matryoshka_dimensions": [16, 32]}'))
    assert proc.returncode != 0
    assert "dimensions 24 is not supported by this model; supported: [16, 32]" in proc.stderr


def test_offline_input_too_long_names_both_numbers(mistral, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("short\n" + tm.LONG_TEXT + "\n")
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", mistral, "--input", str(texts),
                            "--output", str(tmp_path / "o.npy")))
    assert proc.returncode != 0
    assert "input 1 has" in proc.stderr and f"context length of {tm.MAX_SEQ_LENGTH} tokens" in proc.stderr
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", mistral, "--input", str(texts),
                            "--output", str(tmp_path / "o.npy"), "--allow-auto-truncate"))
    assert proc.returncode == 0, proc.stderr


def test_flashinfer_is_not_used_for_head_dim_32():
    # all-MiniLM-L6-v2 has head_dim 32: SDPA on CUDA instead of failing
    assert select_attention(torch.device("cuda"), torch.bfloat16, 32) is not FlashInferAttention
    with pytest.raises(ValueError, match="head_dim in"):
        select_attention(torch.device("cuda"), torch.bfloat16, 32, backend="flashinfer")


def test_preset_with_unknown_setting_is_rejected(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text('{"model-path": "x", "no-such-flag": 1}')
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--config", str(preset), "--input", "x", "--output", "y"))
    assert proc.returncode != 0
    assert "unknown settings ['no-such-flag']" in proc.stderr


def test_chat_template_on_a_model_without_one(mistral, io_args):
    proc = run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", mistral, "--chat-template", "gme-qwen2-vl",
                            *io_args))
    assert proc.returncode != 0
    assert re.search(r"--chat-template gme-qwen2-vl does not apply to \S+: it applies to Qwen2-VL \(GME\) models; "
                     r"use prompt_name for instructions", proc.stderr), proc.stderr[-2000:]


def error_lines(output: str, tracebacks: bool = True) -> list[str]:
    """Lines a user reads as errors: our ERROR lines, 'signal' lines and (`tracebacks`) tracebacks. torchrun's
    own lines (its W/E-prefixed log and, when a rank exits non-zero, its ChildFailedError traceback) are not
    ours: the README says torchrun reports a failed rank that way."""
    ours = [ln for ln in output.splitlines() if not re.match(r"^[WE]\d{4} ", ln)]
    return [ln for ln in ours
            if " ERROR " in ln or "SIGTERM" in ln or "SIGINT" in ln or (tracebacks and ln.startswith("Traceback"))]


@pytest.mark.parametrize("case", ["tp that does not divide the heads", "no such model directory",
                                  "unsupported architecture"])
def test_a_startup_error_is_one_line_from_every_launcher(mistral, tmp_path, case):
    """At tp 2, under the tp-embed command and under torchrun: exactly one error line (rank 0's; the worker
    knows the same and stays quiet), no traceback, no 'signal' line, and a non-zero exit."""
    model = {"tp that does not divide the heads": mistral, "no such model directory": str(tmp_path / "nope"),
             "unsupported architecture": str(tmp_path / "token-classifier")}[case]
    if case == "unsupported architecture":
        os.makedirs(model)
        cfg = json.load(open(os.path.join(mistral, "config.json")))
        json.dump({**cfg, "architectures": ["MistralForTokenClassification"]}, open(f"{model}/config.json", "w"))
    tp = "3" if case.startswith("tp") else "2"
    flags = ["--model-path", model, "--tp", tp, "--port", "0"]
    for launcher in (["-m", "tp_embed"], torchrun_cmd(int(tp), "-m", "tp_embed.launch")[1:]):
        proc = run([torchrun_cmd(1)[0], *launcher, *flags], timeout=240)
        assert proc.returncode != 0
        errors = error_lines(proc.stdout + proc.stderr, tracebacks=launcher[1] == "tp_embed")
        assert len(errors) == 1, f"{launcher}: {errors}"


def test_launch_py_without_torchrun_says_how_to_start_it():
    proc = run([torchrun_cmd(1)[0], "launch.py", "--tp", "2", "--port", "0"], timeout=120)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [error_lines(proc.stderr)[0]]
    assert "launch.py runs one rank of the server, and --tp 2 needs 2" in proc.stderr
    assert "`tp-embed --tp 2 ...`" in proc.stderr and "listening" not in proc.stderr
