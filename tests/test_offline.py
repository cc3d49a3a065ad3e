"""The offline entry point (tp_embed/offline.py): its input file, errors before the model loads, the
progress bar, and data parallelism (one output, the same vectors as one process)."""

import subprocess
import sys

import numpy as np
import pytest

from dist_utils import ROOT, run, torchrun_cmd
from tiny_models import MIXED_TEXTS
from tp_embed.offline import load_input, read_texts


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


def test_load_input_checks_the_texts_and_the_output_directory(tmp_path):
    class Args:
        input, output = str(tmp_path / "t.txt"), str(tmp_path / "out.npy")

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
