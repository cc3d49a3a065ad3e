"""The offline entry point (tp_embed/offline.py): its input file, errors before the model loads, the
progress bar, and data parallelism (one output, the same vectors as one process)."""

import subprocess
import sys

import numpy as np
import pytest

import tiny_rerankers as tr
from dist_utils import ROOT, offline_compute, run, torchrun_cmd
from tiny_models import MIXED_TEXTS
from tp_embed.offline import holds_pairs, load_input, read_pairs, read_texts


def test_read_texts_lines_and_jsonl(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("first\n\nthird line\n")
    assert read_texts(str(plain)) == ["first", "", "third line"]  # row i is line i, blank ones too
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a", "id": 1}\n\n{"text": "b\\nc"}\n')
    assert read_texts(str(jsonl)) == ["a", "b\nc"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": "b"\n', "line 2: not valid JSON"),
    ('{"text": "a"}\n{"body": "b"}\n', 'line 2: expected an object with a string "text" field'),
    ('["a"]\n', 'line 1: expected an object with a string "text" field'),
    ('{"text": 5}\n', 'line 1: expected an object with a string "text" field'),
])
def test_a_bad_jsonl_line_is_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_texts(str(path))
    assert str(e.value).startswith(f"{path}, {message}")


def test_read_pairs_and_what_load_input_reads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q", "document": "d", "id": 7}\n\n{"text_1": "a", "text_2": "b"}\n')
    assert read_pairs(str(path)) == [("q", "d"), ("a", "b")] and holds_pairs(str(path))

    class Args:
        input, output, task = str(path), str(tmp_path / "out.npy"), None

    assert load_input(Args) == [("q", "d"), ("a", "b")]  # a .jsonl of pairs is scored
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a"}\n')
    Args.input = str(texts)
    assert not holds_pairs(str(texts)) and load_input(Args) == ["a"]
    Args.task = "score"
    with pytest.raises(ValueError, match='line 1: expected an object with non-empty string "query"'):
        load_input(Args)


@pytest.mark.parametrize("content, message", [
    ('{"query": "q"}\n', "line 1: expected an object"),
    ('{"query": "q", "document": ""}\n', "line 1: expected an object"),
    ('{"query": "q", "document": "d"}\nnope\n', "line 2: not valid JSON"),
])
def test_a_bad_pair_line_is_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_pairs(str(path))
    with pytest.raises(ValueError, match="reads a .jsonl file"):
        read_pairs(str(tmp_path / "pairs.txt"))


def test_load_input_checks_the_texts_and_the_output_directory(tmp_path):
    class Args:
        input, output, task = str(tmp_path / "t.txt"), str(tmp_path / "out.npy"), None

    (tmp_path / "t.txt").write_text("")
    with pytest.raises(ValueError, match="holds no texts"):
        load_input(Args)
    (tmp_path / "t.txt").write_text("a\n")
    assert load_input(Args) == ["a"]
    Args.output = str(tmp_path / "missing" / "out.npy")
    with pytest.raises(ValueError, match="no such directory"):
        load_input(Args)


def test_input_errors_come_before_torch_loads(tmp_path):
    """A missing input file is reported at once: nothing heavy is imported, no model is loaded."""
    code = ("import sys\n"
            "from tp_embed.offline import main\n"
            f"rc = main(['--input', {str(tmp_path / 'nope.txt')!r}, '--output', 'o.npy'], own_process=True)\n"
            "assert rc == 2, rc\n"
            "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "No such file or directory" in done.stderr and "nope.txt" in done.stderr


def test_only_the_program_chooses_the_allocator(monkeypatch, tmp_path):
    """main() called from Python (a test, a notebook) must not re-execute its process with tcmalloc."""
    import tp_embed.offline as offline
    calls = []
    monkeypatch.setattr(offline, "setup_host_allocator", lambda *a: calls.append(a) or "glibc")
    argv = ["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o.npy"), "--device", "cpu"]
    assert offline.main(argv) == 2 and calls == []
    assert offline.main(argv, own_process=True) == 2 and calls == [("auto", True)]


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("offline") / "texts.txt"
    path.write_text("".join(t.replace("\n", " ") + "\n" for t in MIXED_TEXTS * 3))
    return path


def test_one_process_shows_progress_and_data_parallel_ranks_write_one_equal_output(texts_file, tmp_path):
    one, dp = tmp_path / "one.npy", tmp_path / "dp.npy"
    proc = run([sys.executable, "-m", "tp_embed.offline", "--input", str(texts_file), "--output", str(one)])
    assert proc.returncode == 0, proc.stderr
    n = len(texts_file.read_text().splitlines())
    assert "embedding: 100%" in proc.stderr and f"{n}/{n}" in proc.stderr
    assert f"wrote {one}: {n} x 384" in proc.stderr
    # --dp 2: rank 0 hands batches to both groups (a budget of 256 tokens makes several) and alone writes the file
    proc = run(torchrun_cmd(2, "-m", "tp_embed.offline", "--dp", "2", "--max-batch-tokens", "256",
                            "--no-progress", "--input", str(texts_file), "--output", str(dp)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("wrote ") == 1 and "embedding:" not in proc.stderr
    np.testing.assert_allclose(np.load(dp), np.load(one), atol=1e-5)


def test_scores_pairs_and_classifies_texts_at_dp_2(tmp_path):
    """--task score on a .jsonl of pairs (the default for a cross-encoder) through two data-parallel groups:
    CrossEncoder's scores; --task classify on texts: transformers' probabilities; a task the model does not serve
    and texts given to --task score are errors."""
    ce = tr.make_bert_cross_encoder(str(tmp_path / "ce"))
    pairs = [("what is a cat", t) for t in MIXED_TEXTS]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(f'{{"query": "{q}", "document": {json_string(d)}}}\n' for q, d in pairs))
    out = tmp_path / "scores.npy"
    proc = run(torchrun_cmd(2, "-m", "tp_embed.offline", "--dp", "2", "--max-batch-tokens", "128", "--no-progress",
                            "--model-path", ce, "--input", str(path), "--output", str(out)))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(out), tr.cross_encoder_scores(ce, pairs), atol=1e-5)
    # the rest through the command's own steps in this process (load_input, compute), which says the same
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(t.replace("\n", " ") + "\n" for t in MIXED_TEXTS))
    flags = ["--no-progress", "--model-path", ce, "--input", str(texts), "--output", str(out), "--task"]
    lines = texts.read_text().splitlines()
    np.testing.assert_allclose(offline_compute(flags + ["classify"]), tr.classifier_probs(ce, lines), atol=1e-5)
    with pytest.raises(ValueError, match="reads a .jsonl file"):
        offline_compute(flags + ["score"])
    # and the command: a task the model does not serve is one line and exit 2
    proc = run([sys.executable, "-m", "tp_embed.offline", "--no-progress", "--model-path", ce, "--task", "embed",
                "--input", str(texts), "--output", str(out)])
    assert proc.returncode == 2 and "--task embed: " in proc.stderr and "serves score, rerank, classify" in proc.stderr


def json_string(text: str) -> str:
    import json
    return json.dumps(text)
