"""A batch budget smaller than the context length is accepted and works: an input must fit one batch,
so longer inputs are refused with both numbers named (or truncated when asked), never looped on. On
CUDA the budget is also capped by a profiling pass against free memory (fit_batch_tokens)."""

import numpy as np

import tiny_models as tm
from dist_utils import cosines, run, torchrun_cmd
from tp_embed.engine import fit_batch_tokens


def test_fit_batch_tokens():
    assert fit_batch_tokens(16384, free_bytes=10e9, bytes_per_token=100e3) == 16384
    assert fit_batch_tokens(16384, free_bytes=1e9, bytes_per_token=100e3) == 8500  # 0.85 of 10,000
    assert fit_batch_tokens(16384, free_bytes=0, bytes_per_token=100e3) == 1
    assert fit_batch_tokens(512, free_bytes=1e9, bytes_per_token=0) == 512


def test_small_batch_budget(tmp_path):
    model = tm.make_mistral(str(tmp_path / "m"))
    texts = ["the cat", "a somewhat longer text of several words here", "x"]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")

    def offline(*flags):
        return run(torchrun_cmd(1, "-m", "tp_embed.offline", "--model-path", model, "--input", str(tmp_path / "t.txt"),
                                "--output", str(tmp_path / "o.npy"), *flags))

    proc = offline("--max-batch-tokens", "8")
    assert proc.returncode != 0
    assert "context length of 8 tokens" in proc.stderr
    proc = offline("--max-batch-tokens", "8", "--allow-auto-truncate")
    assert proc.returncode == 0, proc.stderr
    truncated = np.load(tmp_path / "o.npy")
    assert truncated.shape[0] == 3
    # the short texts fit one batch each and equal the reference; the long one was cut to 8 tokens
    ref = tm.st_encode(model, texts)
    cos = cosines(truncated, ref)
    assert cos[0] >= 0.99999 and cos[2] >= 0.99999 and cos[1] < 0.999
    proc = offline("--max-batch-tokens", "64")
    assert proc.returncode == 0, proc.stderr
    assert cosines(np.load(tmp_path / "o.npy"), ref).min() >= 0.99999
