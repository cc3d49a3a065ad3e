"""bge-m3's three outputs over HTTP at tp = 2 (tests/tiny_m3.py's random checkpoint with FlagEmbedding's head
files) against FlagEmbedding's BGEM3FlagModel.encode(..., return_sparse=True, return_colbert_vecs=True): the
dense vector, the sparse lexical weights (`"output": "sparse"` and TEI's POST /embed_sparse) and the ColBERT
vectors (`"output": "colbert"`, float and base64); batches that split a request and mix requests of the three
kinds; chunked long inputs; and the errors. The engine's three outputs at tp = 1, 2 and 4 come from the newer
families' shared torchrun job (tests/family_jobs.py)."""

import base64
import concurrent.futures

import numpy as np
import pytest
import torch

import tiny_m3
import tiny_models as tm
from dist_utils import load_output
from family_jobs import TEXTS as JOB_TEXTS
from family_jobs import TPS
from server_utils import ServerProcess
from tp_embed.token_heads import lexical_weights

BATCH_TOKENS = 64  # requests split over several batches; the context is cut to this too
TEXTS = [t for t in tm.MIXED_TEXTS if len(t) < 200][:14]  # each under 64 tokens


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    path = tiny_m3.make_bge_m3(str(tmp_path_factory.mktemp("m3") / "bge-m3"))
    log = tmp_path_factory.mktemp("m3_log") / "server.log"
    args = ["--model-path", path, "--tp", "2", "--max-batch-tokens", str(BATCH_TOKENS)]
    with ServerProcess(args, nproc=2, log_path=log) as server:
        server.model_dir = path
        yield server


@pytest.fixture(scope="module")
def reference(m3):
    return tiny_m3.flag_reference(m3.model_dir, TEXTS, max_length=BATCH_TOKENS)


def embed(server, output: str | None, texts=TEXTS, **extra):
    body = {"input": texts, **extra}
    if output is not None:
        body["output"] = output
    r = server.post("/v1/embeddings", body)
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def assert_sparse_equal(got: list[dict], expected: list[dict]) -> None:
    """{"indices", "values"} per text against FlagEmbedding's {token id: weight}: the same ids, values to 1e-5."""
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g["indices"] == sorted(e), (i, g["indices"], sorted(e))
        assert np.abs(np.array(g["values"]) - np.array([e[k] for k in sorted(e)])).max(initial=0) < 1e-5, i


def assert_answers(kinds: list, results: list, reference: dict) -> None:
    """Each request's answer (dense for kind None, else its `output`) against FlagEmbedding's."""
    for kind, result in zip(kinds, results):
        if kind is None:
            assert np.abs(np.array(result, dtype=np.float32) - reference["dense"]).max() < 1e-5
        elif kind == "sparse":
            assert_sparse_equal(result, reference["sparse"])
        else:
            assert all(np.abs(np.array(g) - e).max() < 1e-5 for g, e in zip(result, reference["colbert"]))


@pytest.fixture(scope="module")
def job_reference(family_jobs):
    return tiny_m3.flag_reference(family_jobs.checkpoints["bge_m3"], JOB_TEXTS)


@pytest.mark.parametrize("tp", TPS)
def test_the_engines_outputs_at_every_tp(family_jobs, job_reference, tp):
    """Engine.embed's dense vectors and forward_tokens' sparse and ColBERT rows, aggregated as the server does."""
    from transformers import AutoTokenizer
    path = family_jobs.checkpoints["bge_m3"]
    dense = load_output(family_jobs.dirs, tp, "bge_m3")
    assert np.abs(dense - job_reference["dense"]).max() < 1e-5
    tokenizer = AutoTokenizer.from_pretrained(path)
    sequences = tokenizer(JOB_TEXTS)["input_ids"]
    lengths = [len(s) for s in sequences]
    unused = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    weights = np.split(load_output(family_jobs.dirs, tp, "bge_m3", "sparse.npy"), np.cumsum(lengths)[:-1])
    got = []
    for ids, w in zip(sequences, weights):
        indices, values = lexical_weights(ids, w, unused)
        got.append({"indices": indices.tolist(), "values": values.tolist()})
    assert_sparse_equal(got, job_reference["sparse"])
    vectors = np.split(load_output(family_jobs.dirs, tp, "bge_m3", "colbert.npy"), np.cumsum(lengths)[:-1])
    for v, expected in zip(vectors, job_reference["colbert"]):
        assert v[1:].shape == expected.shape and np.abs(v[1:] - expected).max() < 1e-5


def test_the_reference_is_not_degenerate(reference):
    sizes = [len(s) for s in reference["sparse"]]
    assert sum(sizes) > 30 and 0 in sizes  # relu leaves some texts without a weight, others with many


def test_dense_sparse_and_colbert_match_flagembedding(m3, reference):
    dense = np.array(embed(m3, None), dtype=np.float32)
    assert np.abs(dense - reference["dense"]).max() < 1e-5
    assert_sparse_equal(embed(m3, "sparse"), reference["sparse"])
    for got, expected in zip(embed(m3, "colbert"), reference["colbert"]):
        got = np.array(got, dtype=np.float32)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    for got, expected in zip(embed(m3, "colbert", encoding_format="base64"), reference["colbert"]):
        matrix = np.frombuffer(base64.b64decode(got), dtype="<f4").reshape(-1, tiny_m3.COLBERT_DIM)
        assert np.abs(matrix - expected).max() < 1e-5


def test_tei_embed_sparse(m3, reference):
    r = m3.post("/embed_sparse", {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    got = [{"indices": [e["index"] for e in row], "values": [e["value"] for e in row]} for row in r.json()]
    assert_sparse_equal(got, reference["sparse"])
    one = m3.post("/embed_sparse", {"inputs": TEXTS[7], "parameters": {"truncate": True}}).json()
    assert len(one) == 1 and [e["index"] for e in one[0]] == sorted(reference["sparse"][7])


def test_requests_of_the_three_kinds_at_once(m3, reference):
    """Batches never mix kinds: every answer is right whatever was queued beside it."""
    kinds = [None, "sparse", "colbert"] * 4
    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        results = list(pool.map(lambda kind: embed(m3, kind), kinds))
    assert_answers(kinds, results, reference)


def test_data_parallel_groups_serve_the_token_heads(m3, reference, tmp_path):
    """--dp 2 --tp 1: a group-1 leader applies the sparse and ColBERT heads itself and sends their rows back;
    concurrent requests of the three kinds, in batches of two inputs, get the same answers as at tp 2."""
    args = ["--model-path", m3.model_dir, "--dp", "2", "--max-batch-tokens", str(BATCH_TOKENS),
            "--max-batch-seqs", "2"]
    kinds = [None, "sparse", "colbert"] * 3
    with ServerProcess(args, nproc=2, log_path=tmp_path / "server.log") as server:
        with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
            results = list(pool.map(lambda kind: embed(server, kind), kinds))
        batches = [server.metric("tp_embed_group_batches_total", f'group="{g}"') for g in range(2)]
    assert all(n > 0 for n in batches), f"batches per group: {batches}"
    assert_answers(kinds, results, reference)


def by_hand(model_dir: str, windows: list[list[int]]) -> tuple[dict, np.ndarray]:
    """One chunked input's sparse weights (the largest per id over every window's tokens) and ColBERT vectors
    (each window's after its first token, in order), from transformers' hidden states and the head files."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(model_dir).eval()
    sparse = torch.load(f"{model_dir}/sparse_linear.pt")
    colbert = torch.load(f"{model_dir}/colbert_linear.pt")
    weights, vectors = {}, []
    with torch.no_grad():
        for ids in windows:
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            w = torch.relu(hidden @ sparse["weight"].T + sparse["bias"])[:, 0]
            for token, value in zip(ids[1:-1], w[1:-1].tolist()):  # <s> and </s> are left out
                if value > 0:
                    weights[token] = max(weights.get(token, 0.0), value)
            vectors.append(torch.nn.functional.normalize(hidden[1:] @ colbert["weight"].T + colbert["bias"], dim=-1))
    return weights, torch.cat(vectors).numpy()


def test_chunked_long_input(m3):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(m3.model_dir)
    ids = tokenizer(tm.LONG_TEXT)["input_ids"]
    windows = [[ids[0]] + ids[1:-1][j:j + BATCH_TOKENS - 2] + [ids[-1]]
               for j in range(0, len(ids) - 2, BATCH_TOKENS - 2)]
    assert len(windows) >= 3
    weights, vectors = by_hand(m3.model_dir, windows)
    sparse = embed(m3, "sparse", texts=[tm.LONG_TEXT], long_inputs="chunk")[0]
    assert sparse["indices"] == sorted(weights)
    assert np.abs(np.array(sparse["values"]) - np.array([weights[k] for k in sorted(weights)])).max() < 1e-5
    colbert = np.array(embed(m3, "colbert", texts=[tm.LONG_TEXT], long_inputs="chunk")[0], dtype=np.float32)
    assert colbert.shape == vectors.shape and np.abs(colbert - vectors).max() < 1e-5


@pytest.mark.parametrize("body, param", [
    ({"output": "colbert", "dimensions": 16}, "dimensions"),
    ({"output": "sparse", "normalize": True}, "normalize"),
    ({"output": "sparse", "encoding_format": "base64"}, "encoding_format"),
    ({"output": "multi"}, "output"),
])
def test_bad_output_requests_are_400(m3, body, param):
    r = m3.post("/v1/embeddings", {"input": "hello", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_model_without_the_heads_says_what_it_serves(minilm):
    r = minilm.post("/v1/embeddings", {"input": "hello", "output": "sparse"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "task_not_supported", r.text
    tei = minilm.post("/embed_sparse", {"inputs": "hello"})
    assert tei.status_code == 422 and "sparse" in tei.json()["error"], tei.text
