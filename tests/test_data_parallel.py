"""--dp: several tensor-parallel groups in one torchrun job behind one endpoint.

On CPU with gloo: --dp 2 --tp 2 (4 processes) and --dp 2 --tp 1 serve vectors equal to the tp = 1
engine's, and both groups computed batches (the per-group counters of /metrics).
"""

import concurrent.futures

import numpy as np
import pytest

import tiny_models as tm
from dist_utils import cosines, embed_models
from server_utils import ServerProcess, response_vectors

TEXTS = tm.MIXED_TEXTS


@pytest.fixture(scope="module")
def reference(tiny_mistral_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dp-ref"))
    embed_models(1, out, TEXTS, [{"name": "ref", "flags": ["--model-path", tiny_mistral_dir]}])
    return np.load(f"{out}/ref.npy")


@pytest.mark.parametrize("dp,tp", [(2, 2), (2, 1)])
def test_data_parallel_groups_serve_the_tp1_vectors(tiny_mistral_dir, reference, tmp_path, dp, tp):
    args = ["--model-path", tiny_mistral_dir, "--dp", str(dp), "--tp", str(tp), "--max-batch-seqs", "2"]
    with ServerProcess(args, nproc=dp * tp, log_path=tmp_path / "server.log") as server:
        def one(i: int):
            idx = [(i + k) % len(TEXTS) for k in range(4)]
            r = server.post("/v1/embeddings", json={"input": [TEXTS[j] for j in idx]})
            assert r.status_code == 200, r.text
            return idx, response_vectors(r.json())

        # enough concurrent work, in batches of at most 2 inputs, that a free group is always wanted
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(24)))
        for idx, vectors in results:
            assert cosines(vectors, reference[idx]).min() >= 0.99999
        batches = {g: server.metric("tp_embed_group_batches_total", f'group="{g}"') for g in range(dp)}
        assert all(n > 0 for n in batches.values()), f"batches per group: {batches}"
        assert sum(batches.values()) >= 24 * 4 / 2


def test_dp_needs_dp_times_tp_processes(tiny_mistral_dir, tmp_path):
    server = ServerProcess(["--model-path", tiny_mistral_dir, "--dp", "2", "--tp", "2"], nproc=2,
                           log_path=tmp_path / "server.log", startup_timeout=60)
    with pytest.raises(RuntimeError):
        with server:
            pass
    assert "--dp 2 x --tp 2 = 4 needs exactly 4 processes, but torchrun started 2" in server.log()
