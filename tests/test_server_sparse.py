"""A SPLADE model over HTTP (tests/tiny_splade.py's BERT, served at tp = 2): `"output": "sparse"` on
/v1/embeddings and TEI's POST /embed_sparse and POST / against sentence-transformers' SparseEncoder.encode, TEI's
/info, and what a sparse-only model answers to a request for dense vectors."""

import numpy as np
import pytest

import tiny_models as tm
import tiny_splade as tsp
from server_utils import ServerProcess

TEXTS = tm.MIXED_TEXTS[:10]


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    path = tsp.make_splade_bert(str(tmp_path_factory.mktemp("splade") / "splade"))
    log = tmp_path_factory.mktemp("splade_log") / "server.log"
    with ServerProcess(["--model-path", path, "--tp", "2", "--max-batch-tokens", "48"], nproc=2,
                       log_path=log) as server:
        server.model_dir = path
        yield server


@pytest.fixture(scope="module")
def reference(splade):
    return tsp.sparse_encode(splade.model_dir, TEXTS)


def assert_rows_equal(got: list[tuple[list, list]], expected: np.ndarray) -> None:
    """(indices, values) per text against SparseEncoder's dense rows: the same nonzeros, values to 1e-5."""
    for i, (indices, values) in enumerate(got):
        assert indices == np.flatnonzero(expected[i]).tolist(), i
        assert np.abs(np.array(values) - expected[i][indices]).max(initial=0) < 1e-5, i


def test_v1_embeddings_output_sparse(splade, reference):
    r = splade.post("/v1/embeddings", {"input": TEXTS, "output": "sparse"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_rows_equal([(d["embedding"]["indices"], d["embedding"]["values"]) for d in body["data"]], reference)
    assert body["usage"]["prompt_tokens"] > len(TEXTS)


@pytest.mark.parametrize("path", ["/embed_sparse", "/"])
def test_tei_embed_sparse_and_root(splade, reference, path):
    r = splade.post(path, {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    assert_rows_equal([([e["index"] for e in row], [e["value"] for e in row]) for row in r.json()], reference)


def test_info_and_tasks(splade):
    assert splade.get("/info").json()["model_type"] == {"embedding": {"pooling": "splade"}}
    assert splade.get("/v1/models").json()["data"][0]["tasks"] == ["sparse"]


def test_dense_vectors_are_refused_with_what_it_serves(splade):
    r = splade.post("/v1/embeddings", {"input": "hello"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "task_not_supported", r.text
    assert "sparse" in r.json()["error"]["message"]
    r = splade.post("/embed", {"inputs": "hello"})
    assert r.status_code == 422 and "sparse" in r.json()["error"], r.text
    r = splade.post("/v1/embeddings", {"input": "hello", "output": "colbert"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "task_not_supported", r.text
    r = splade.post("/v1/embeddings", {"input": "hello", "output": "sparse", "long_inputs": "chunk"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "long_inputs", r.text
