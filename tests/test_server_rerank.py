"""Rerank, score and classify over HTTP on the real server under torchrun (gloo, CPU, float32), against the
references of tests/tiny_rerankers.py and tests/tiny_models.py:

* a BERT cross-encoder (one label) at tp 2: /v1/rerank, /rerank, /v2/rerank (also through the official cohere
  client), /v1/score, /v1/classify against sentence-transformers' CrossEncoder and transformers; usage; bad
  requests are 400s that leave the server serving; a request bigger than a batch is split and scores the same;
* a Qwen3-Reranker at tp 2 started from its preset (configs/Qwen3-Reranker-0.6B.json) against the model card's
  recipe, with and without an instruction;
* an embedding model at tp 1: score and rerank are cosines of its query and document embeddings.
"""

import math

import cohere
import numpy as np
import pytest
from transformers import AutoTokenizer

import tiny_models as tm
import tiny_rerankers as tr
from server_utils import ServerProcess, response_vectors

ATOL = 1e-5
CE_NAME = "ce"
MAX_DOCS = 50
# 256 = the tiny models' context: a smaller --max-batch-tokens would also cut the context to it (engine.build_text),
# and the references (CrossEncoder, the tokenizer's max_length 256) would no longer read the same pairs
BATCH_TOKENS = 256
QUERY = "What is the capital of France?"
DOCS = tm.MIXED_TEXTS[:12]  # pairs of 11 to 37 tokens
INSTRUCTION = "Given a question, find passages that answer it"
_WORDS = tm.LONG_TEXT.split()
# 40 documents of 20 to 59 words (~5600 pair tokens in all): over 20 batches of BATCH_TOKENS
BIG_DOCS = [" ".join(_WORDS[7 * i:7 * i + 20 + i]) for i in range(40)]
EMBED_PROMPTS = {"query": "query: ", "passage": "passage: "}  # documents take "passage" (no "document" prompt)
BATCHES = 'tp_embed_group_batches_total'


# ---- fixtures ----

@pytest.fixture(scope="module")
def ce(tmp_path_factory):
    d = tr.make_bert_cross_encoder(str(tmp_path_factory.mktemp("ce") / "model"))
    log = tmp_path_factory.mktemp("logs") / "ce.log"
    args = ["--model-path", d, "--tp", "2", "--served-model-name", CE_NAME, "--max-batch-tokens", str(BATCH_TOKENS),
            "--max-rerank-documents", str(MAX_DOCS)]
    with ServerProcess(args, nproc=2, log_path=log) as server:
        server.model_dir = d
        server.tokenizer = AutoTokenizer.from_pretrained(d)
        yield server


@pytest.fixture(scope="module")
def ce_ref(ce):
    """CrossEncoder's scores (sigmoid) and logits of QUERY against DOCS."""
    pairs = [(QUERY, d) for d in DOCS]
    return {"scores": tr.cross_encoder_scores(ce.model_dir, pairs),
            "logits": tr.cross_encoder_scores(ce.model_dir, pairs, activation=False)}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = tr.make_qwen3_reranker(str(tmp_path_factory.mktemp("qwen3") / "model"))
    log = tmp_path_factory.mktemp("logs") / "qwen3.log"
    # the preset's --model-path (Qwen/Qwen3-Reranker-0.6B) gives way to ours; its context-length 8192 is over the
    # tiny model's 512 positions (a startup error), so --context-length 512 overrides it too
    args = ["--config", "configs/Qwen3-Reranker-0.6B.json", "--model-path", d, "--tp", "2", "--context-length", "512"]
    with ServerProcess(args, nproc=2, log_path=log) as server:
        server.model_dir = d
        server.tokenizer = AutoTokenizer.from_pretrained(d)
        yield server


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    d = tm.make_bert(str(tmp_path_factory.mktemp("bert") / "model"), prompts=EMBED_PROMPTS)
    log = tmp_path_factory.mktemp("logs") / "bert.log"
    with ServerProcess(["--model-path", d, "--tp", "1", "--served-model-name", "emb"], nproc=1,
                       log_path=log) as server:
        server.model_dir = d
        yield server


# ---- helpers ----

def ok(server, path: str, body: dict) -> dict:
    r = server.post(path, body)
    assert r.status_code == 200, r.text
    return r.json()


def error(server, path: str, body: dict, status: int = 400) -> dict:
    r = server.post(path, body)
    assert r.status_code == status, r.text
    return r.json()["error"]


def pair_tokens(tokenizer, query: str, documents: list[str]) -> int:
    return sum(len(tokenizer(query, d, truncation="only_second", max_length=256)["input_ids"]) for d in documents)


def check_ranking(results: list[dict], expected: np.ndarray, atol: float = ATOL) -> None:
    """results sorted by relevance_score, every index distinct, each score its reference's."""
    indices = [r["index"] for r in results]
    scores = [r["relevance_score"] for r in results]
    assert len(set(indices)) == len(indices) and set(indices) <= set(range(len(expected)))
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, expected[indices], atol=atol)


def score_values(body: dict) -> np.ndarray:
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "score" for d in body["data"])
    return np.array([d["score"] for d in body["data"]])


# ---- the cross-encoder ----

@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_matches_cross_encoder(ce, ce_ref, path):
    body = ok(ce, path, {"model": CE_NAME, "query": QUERY, "documents": DOCS})
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    check_ranking(results, ce_ref["scores"])
    assert [r["document"]["text"] for r in results] == [DOCS[r["index"]] for r in results]
    assert body["model"] == CE_NAME and body["id"].startswith("rerank-")
    num_tokens = pair_tokens(ce.tokenizer, QUERY, DOCS)
    assert num_tokens > 0
    assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    assert body["meta"]["billed_units"]["input_tokens"] == num_tokens


def test_rerank_top_n_documents_and_raw_scores(ce, ce_ref):
    full = ok(ce, "/v1/rerank", {"query": QUERY, "documents": DOCS})["results"]
    top = ok(ce, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3})["results"]
    assert top == full[:3]
    assert ok(ce, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 100})["results"] == full
    bare = ok(ce, "/v1/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False})["results"]
    assert all(set(r) == {"index", "relevance_score"} for r in bare)
    assert [r["index"] for r in bare] == [r["index"] for r in full]
    objects = ok(ce, "/v1/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCS]})["results"]
    assert objects == full
    raw = ok(ce, "/v1/rerank", {"query": QUERY, "documents": DOCS, "raw_scores": True})["results"]
    check_ranking(raw, ce_ref["logits"])
    assert [r["index"] for r in raw] == [r["index"] for r in full]  # sigmoid keeps the order
    by_index = {r["index"]: r["relevance_score"] for r in full}
    np.testing.assert_allclose([1 / (1 + math.exp(-r["relevance_score"])) for r in raw],
                               [by_index[r["index"]] for r in raw], atol=1e-6)


def test_max_tokens_per_doc_cuts_documents(ce):
    """Cohere's max_tokens_per_doc: each document scored on its first N tokens, returned whole."""
    n = 4
    enc = ce.tokenizer(DOCS, add_special_tokens=False, return_offsets_mapping=True)
    cut = [d if len(o) <= n else d[:o[n - 1][1]] for d, o in zip(DOCS, enc["offset_mapping"])]
    assert sum(c != d for c, d in zip(cut, DOCS)) >= 6
    expected = tr.cross_encoder_scores(ce.model_dir, [(QUERY, c) for c in cut])
    body = ok(ce, "/v1/rerank", {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": n})
    check_ranking(body["results"], expected)
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in body["results"])
    assert body["usage"]["total_tokens"] == pair_tokens(ce.tokenizer, QUERY, cut)


def test_cohere_client_matches_http(ce):
    client = cohere.ClientV2(base_url=ce.url, api_key="k")
    response = client.rerank(model=CE_NAME, query=QUERY, documents=DOCS, top_n=5)
    http = ok(ce, "/v2/rerank", {"model": CE_NAME, "query": QUERY, "documents": DOCS, "top_n": 5})["results"]
    assert [r.index for r in response.results] == [r["index"] for r in http]
    np.testing.assert_allclose([r.relevance_score for r in response.results], [r["relevance_score"] for r in http],
                               atol=1e-6)
    assert len(response.results) == 5
    # the client's other arguments: Cohere's document cut and priority are taken, an explicit null span too
    cut = client.rerank(model=CE_NAME, query=QUERY, documents=DOCS, max_tokens_per_doc=4, priority=1,
                        relevant_spans=None)
    assert sorted(r.index for r in cut.results) == list(range(len(DOCS)))


def test_score_pairings(ce, ce_ref):
    one = ok(ce, "/v1/score", {"model": CE_NAME, "text_1": QUERY, "text_2": DOCS[3]})
    assert one["model"] == CE_NAME and one["id"].startswith("score-")
    np.testing.assert_allclose(score_values(one), ce_ref["scores"][3:4], atol=ATOL)
    assert one["usage"]["total_tokens"] == pair_tokens(ce.tokenizer, QUERY, DOCS[3:4])
    np.testing.assert_allclose(score_values(ok(ce, "/v1/score", {"text_1": QUERY, "text_2": DOCS})),
                               ce_ref["scores"], atol=ATOL)
    np.testing.assert_allclose(score_values(ok(ce, "/score", {"text_1": [QUERY], "text_2": DOCS})),
                               ce_ref["scores"], atol=ATOL)
    firsts, seconds = DOCS[:4], DOCS[4:8]
    n_to_n = ok(ce, "/v1/score", {"text_1": firsts, "text_2": seconds, "raw_scores": True})
    np.testing.assert_allclose(score_values(n_to_n),
                               tr.cross_encoder_scores(ce.model_dir, list(zip(firsts, seconds)), activation=False),
                               atol=ATOL)
    assert n_to_n["usage"]["total_tokens"] == sum(pair_tokens(ce.tokenizer, a, [b]) for a, b in zip(firsts, seconds))
    err = error(ce, "/v1/score", {"text_1": DOCS[:2], "text_2": DOCS[:3]})
    assert err["param"] == "text_2"


def test_classify_one_label(ce):
    texts = DOCS[:6]
    for path in ("/v1/classify", "/classify"):
        body = ok(ce, path, {"model": CE_NAME, "input": texts})
        assert [d["index"] for d in body["data"]] == list(range(len(texts)))
        assert all(d["num_classes"] == 1 and d["label"] == "LABEL_0" for d in body["data"])
        probs = np.array([d["probs"] for d in body["data"]])
        logits = tr.classifier_logits(ce.model_dir, texts)
        np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), atol=ATOL)
        np.testing.assert_allclose(probs, tr.classifier_probs(ce.model_dir, texts), atol=ATOL)
        assert body["usage"]["total_tokens"] == sum(len(ids) for ids in ce.tokenizer(texts)["input_ids"])
    single = ok(ce, "/v1/classify", {"input": texts[2]})["data"]
    np.testing.assert_allclose(single[0]["probs"], probs[2], atol=1e-6)
    err = error(ce, "/v1/classify", {"input": ["a", tm.LONG_TEXT]})
    assert err["param"] == "input" and err["code"] == "context_length_exceeded"
    cut = ok(ce, "/v1/classify", {"input": [tm.LONG_TEXT], "truncate": True})
    np.testing.assert_allclose(cut["data"][0]["probs"], tr.classifier_probs(ce.model_dir, [tm.LONG_TEXT])[0],
                               atol=ATOL)
    assert cut["usage"]["total_tokens"] == 256


def test_embeddings_refused_and_tasks_listed(ce):
    err = error(ce, "/v1/embeddings", {"input": "hello"})
    assert err["code"] == "task_not_supported"
    assert "embed" in err["message"] and "score, rerank, classify" in err["message"]
    models = ce.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [CE_NAME]
    assert models[0]["tasks"] == ["score", "rerank", "classify"]
    assert models[0]["max_model_len"] == 256


BAD_RERANKS = {
    "empty query": ({"query": "", "documents": ["a"]}, "query", None),
    "missing query": ({"documents": ["a"]}, "query", None),
    "empty documents": ({"query": QUERY, "documents": []}, "documents", None),
    "documents a string": ({"query": QUERY, "documents": "a"}, "documents", None),
    "too many documents": ({"query": QUERY, "documents": ["a"] * (MAX_DOCS + 1)}, "documents", None),
    "top_n 0": ({"query": QUERY, "documents": ["a"], "top_n": 0}, "top_n", None),
    "top_n a string": ({"query": QUERY, "documents": ["a"], "top_n": "2"}, "top_n", None),
    "a number": ({"query": QUERY, "documents": ["a", 3.5]}, "documents", None),
    "a misspelt object": ({"query": QUERY, "documents": [{"txt": "a"}]}, "documents", None),
    "a list": ({"query": QUERY, "documents": [["a"]]}, "documents", None),
    "an empty document": ({"query": QUERY, "documents": ["a", ""]}, "documents", None),
    "unknown field": ({"query": QUERY, "documents": ["a"], "temperature": 0}, "temperature", None),
    "instruction": ({"query": QUERY, "documents": ["a"], "instruction": "x"}, "instruction", None),
    "query too long": ({"query": tm.LONG_TEXT, "documents": ["a"]}, "query", "context_length_exceeded"),
    "relevant_spans": ({"query": QUERY, "documents": ["a"], "relevant_spans": {"enabled": True}}, "relevant_spans",
                       None),
}


@pytest.mark.parametrize("case", BAD_RERANKS)
def test_bad_rerank_is_400(ce, case):
    body, param, code = BAD_RERANKS[case]
    err = error(ce, "/v1/rerank", body)
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    if code is not None:
        assert err["code"] == code, err


def test_bad_model_and_bad_score_requests(ce):
    err = error(ce, "/v1/rerank", {"model": "nope", "query": QUERY, "documents": ["a"]}, 404)
    assert err["param"] == "model" and err["code"] == "model_not_found"
    assert error(ce, "/v1/score", {"text_1": [], "text_2": "a"})["param"] == "text_1"
    assert error(ce, "/v1/score", {"text_1": "a", "text_2": ["b", 1]})["param"] == "text_2"
    assert error(ce, "/v1/classify", {"input": []})["param"] == "input"
    err = error(ce, "/v1/score", {"text_1": tm.LONG_TEXT, "text_2": "b"})
    assert err["param"] == "text_1" and err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path, body, param", [("/v1/score", {"text_1": 5, "text_2": "a"}, "text_1"),
                                               ("/v1/classify", {"input": {"text": "a"}}, "input")])
def test_a_wrong_type_names_the_field(ce, path, body, param):
    err = error(ce, path, body)
    assert err["param"] == param and "must be a string or a list of strings" in err["message"]


def test_server_keeps_serving_after_bad_requests(ce, ce_ref):
    errors = ce.metric("tp_embed_errors_total", 'code="none",status="400"')
    error(ce, "/v1/rerank", {"query": QUERY, "documents": [None]})
    assert ce.metric("tp_embed_errors_total", 'code="none",status="400"') == errors + 1
    assert ce.get("/health").status_code == 200
    check_ranking(ok(ce, "/v1/rerank", {"query": QUERY, "documents": DOCS})["results"], ce_ref["scores"])


def test_a_rerank_bigger_than_a_batch_is_split_and_scores_the_same(ce):
    num_tokens = pair_tokens(ce.tokenizer, QUERY, BIG_DOCS)
    assert num_tokens > 6 * BATCH_TOKENS
    before = ce.metric(BATCHES, 'group="0"')
    body = ok(ce, "/v1/rerank", {"query": QUERY, "documents": BIG_DOCS, "return_documents": False})
    batches = ce.metric(BATCHES, 'group="0"') - before
    assert batches > 1, batches
    assert body["usage"]["total_tokens"] == num_tokens
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(BIG_DOCS)))
    alone = np.array([ok(ce, "/v1/rerank", {"query": QUERY, "documents": [d]})["results"][0]["relevance_score"]
                      for d in BIG_DOCS])
    check_ranking(results, alone, atol=1e-6)
    check_ranking(results, tr.cross_encoder_scores(ce.model_dir, [(QUERY, d) for d in BIG_DOCS]))


# ---- Qwen3-Reranker ----

@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_qwen3_reranker_matches_the_model_card(qwen3, instruction):
    docs = DOCS[:8] + [tm.LONG_TEXT]  # the last is cut to the context
    request = {"query": QUERY, "documents": docs}
    if instruction is not None:
        request["instruction"] = instruction
    body = ok(qwen3, "/v1/rerank", request)
    expected = tr.qwen3_reranker_scores(qwen3.model_dir, QUERY, docs, instruction)
    assert sorted(r["index"] for r in body["results"]) == list(range(len(docs)))
    check_ranking(body["results"], expected)
    ids = tr.qwen3_reranker_input_ids(qwen3.tokenizer, QUERY, docs, instruction)
    assert max(map(len, ids)) == 512
    assert body["usage"]["total_tokens"] == sum(map(len, ids))
    scores = ok(qwen3, "/v1/score", {"text_1": QUERY, "text_2": docs, **({"instruction": instruction}
                                                                          if instruction else {})})
    np.testing.assert_allclose(score_values(scores), expected, atol=ATOL)


def test_qwen3_reranker_instruction_matters_and_the_path_wins(qwen3):
    plain = tr.qwen3_reranker_scores(qwen3.model_dir, QUERY, DOCS[:4])
    instructed = tr.qwen3_reranker_scores(qwen3.model_dir, QUERY, DOCS[:4], INSTRUCTION)
    assert np.abs(plain - instructed).max() > 1e-3  # so the test above tells them apart
    card = qwen3.get("/v1/models").json()["data"][0]
    assert card["root"] == qwen3.model_dir and card["id"] == qwen3.model_dir
    assert card["max_model_len"] == 512 and card["tasks"] == ["score", "rerank"]
    err = error(qwen3, "/v1/classify", {"input": "a text without its pair"})
    assert err["code"] == "task_not_supported" and "serves score, rerank" in err["message"]
    err = error(qwen3, "/v1/rerank", {"query": tm.LONG_TEXT, "documents": ["a"]})
    assert err["param"] == "query" and err["code"] == "context_length_exceeded"
    err = error(qwen3, "/v1/score", {"text_1": ["a", tm.LONG_TEXT], "text_2": ["b", "c"], "instruction": "x"})
    assert err["param"] == "text_1" and "text_1[1]" in err["message"]


# ---- an embedding model ----

def embeddings(server, texts: list[str], prompt_name: str) -> tuple[np.ndarray, int]:
    body = ok(server, "/v1/embeddings", {"input": texts, "prompt_name": prompt_name, "truncate": True,
                                         "encoding_format": "float"})
    return response_vectors(body), body["usage"]["total_tokens"]


def test_embedding_model_scores_by_cosine(embedder):
    docs = DOCS[:8] + [tm.LONG_TEXT]  # documents are truncated to the context
    query_vec, query_tokens = embeddings(embedder, [QUERY], "query")
    doc_vecs, doc_tokens = embeddings(embedder, docs, "passage")
    expected = doc_vecs @ query_vec[0]
    st = tm.st_encode(embedder.model_dir, docs, prompt_name="passage") @ \
        tm.st_encode(embedder.model_dir, [QUERY], prompt_name="query")[0]
    np.testing.assert_allclose(expected, st, atol=ATOL)
    unprompted = tm.st_encode(embedder.model_dir, docs) @ tm.st_encode(embedder.model_dir, [QUERY])[0]
    assert np.abs(unprompted - st).max() > 1e-3  # the prompts matter

    rerank = ok(embedder, "/v1/rerank", {"query": QUERY, "documents": docs})
    assert sorted(r["index"] for r in rerank["results"]) == list(range(len(docs)))
    check_ranking(rerank["results"], expected)
    check_ranking(rerank["results"], st)
    assert rerank["usage"]["total_tokens"] == query_tokens + doc_tokens
    top = ok(embedder, "/rerank", {"query": QUERY, "documents": docs, "top_n": 2, "return_documents": False})
    assert top["results"] == [{k: r[k] for k in ("index", "relevance_score")} for r in rerank["results"][:2]]

    score = ok(embedder, "/v1/score", {"text_1": QUERY, "text_2": docs})
    np.testing.assert_allclose(score_values(score), expected, atol=ATOL)
    firsts = [QUERY, DOCS[9], QUERY, DOCS[10]]  # a repeated query
    seconds = DOCS[:4]
    firsts_vecs, _ = embeddings(embedder, firsts, "query")
    n_to_n = ok(embedder, "/v1/score", {"text_1": firsts, "text_2": seconds})
    np.testing.assert_allclose(score_values(n_to_n), (firsts_vecs * doc_vecs[:4]).sum(-1), atol=ATOL)
    same = ok(embedder, "/v1/score", {"text_1": [QUERY, QUERY], "text_2": seconds[:2]})
    np.testing.assert_allclose(score_values(same), expected[:2], atol=ATOL)


def test_embedding_model_refuses_classify_and_head_options(embedder):
    err = error(embedder, "/v1/classify", {"input": "hello"})
    assert err["code"] == "task_not_supported" and "embed, score, rerank" in err["message"]
    assert error(embedder, "/v1/rerank", {"query": QUERY, "documents": ["a"], "raw_scores": True})["param"] == \
        "raw_scores"
    assert error(embedder, "/v1/score", {"text_1": QUERY, "text_2": "a", "raw_scores": True})["param"] == "raw_scores"
    assert error(embedder, "/v1/rerank", {"query": QUERY, "documents": ["a"], "instruction": "x"})["param"] == \
        "instruction"
    err = error(embedder, "/v1/rerank", {"query": tm.LONG_TEXT, "documents": ["a"]})
    assert err["param"] == "query" and err["code"] == "context_length_exceeded"
    assert embedder.get("/v1/models").json()["data"][0]["tasks"] == ["embed", "score", "rerank"]


# ---- text-embeddings-inference's /rerank shape (tp_embed/tei.py) ----

def tei_rerank(server, body: dict) -> list[dict]:
    r = server.post("/rerank", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_tei_rerank_scores_as_the_rerank_route(ce, ce_ref):
    ranks = tei_rerank(ce, {"query": QUERY, "texts": DOCS})
    assert all(set(r) == {"index", "score"} for r in ranks)
    assert sorted(r["index"] for r in ranks) == list(range(len(DOCS)))
    scores = [r["score"] for r in ranks]
    assert scores == sorted(scores, reverse=True)
    cohere_shape = ok(ce, "/rerank", {"query": QUERY, "documents": DOCS})["results"]
    assert [r["index"] for r in ranks] == [r["index"] for r in cohere_shape]
    np.testing.assert_allclose(scores, [r["relevance_score"] for r in cohere_shape], atol=1e-6)
    np.testing.assert_allclose(scores, ce_ref["scores"][[r["index"] for r in ranks]], atol=ATOL)
    texts = tei_rerank(ce, {"query": QUERY, "texts": DOCS, "return_text": True, "truncate": True,
                            "truncation_direction": "right"})
    assert [r["text"] for r in texts] == [DOCS[r["index"]] for r in texts]
    assert [r["index"] for r in texts] == [r["index"] for r in ranks]


def test_tei_rerank_raw_scores_are_the_logits(ce, ce_ref):
    ranks = tei_rerank(ce, {"query": QUERY, "texts": DOCS})
    raw = tei_rerank(ce, {"query": QUERY, "texts": DOCS, "raw_scores": True, "truncate": False})
    assert [r["index"] for r in raw] == [r["index"] for r in ranks]  # the sigmoid keeps the order
    logits = np.array([r["score"] for r in raw])
    np.testing.assert_allclose(logits, ce_ref["logits"][[r["index"] for r in raw]], atol=ATOL)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), [r["score"] for r in ranks], atol=1e-6)
    by_index = {r["index"]: r["score"] for r in ranks}  # the inverse sigmoid of each score
    np.testing.assert_allclose(logits, [math.log(by_index[r["index"]] / (1 - by_index[r["index"]])) for r in raw],
                               atol=1e-4)


BAD_TEI_RERANKS = {
    "missing texts": ({"query": QUERY, "return_text": True}, "texts"),
    "empty texts": ({"query": QUERY, "texts": []}, "texts"),
    "texts a string": ({"query": QUERY, "texts": "a"}, "texts"),
    "a number in texts": ({"query": QUERY, "texts": ["a", 3]}, "texts"),
    "an empty text": ({"query": QUERY, "texts": ["a", ""]}, "texts[1]"),
    "too many texts": ({"query": QUERY, "texts": ["a"] * (MAX_DOCS + 1)}, "--max-rerank-documents"),
    "missing query": ({"texts": ["a"]}, "query"),
    "empty query": ({"query": "", "texts": ["a"]}, "query"),
    "query a number": ({"query": 1, "texts": ["a"]}, "query"),
    "raw_scores a string": ({"query": QUERY, "texts": ["a"], "raw_scores": "yes"}, "raw_scores"),
    "return_text a number": ({"query": QUERY, "texts": ["a"], "return_text": 1}, "return_text"),
    "truncate a string": ({"query": QUERY, "texts": ["a"], "truncate": "true"}, "truncate"),
    "an unknown direction": ({"query": QUERY, "texts": ["a"], "truncation_direction": "Up"}, "truncation_direction"),
    "Left": ({"query": QUERY, "texts": ["a"], "truncation_direction": "Left"}, "only Right"),
    "unknown field": ({"query": QUERY, "texts": ["a"], "top_n": 1}, "top_n"),
    "documents and texts": ({"query": QUERY, "texts": ["a"], "documents": ["a"]}, "documents"),
    "query too long": ({"query": tm.LONG_TEXT, "texts": ["a"]}, "query"),
}


@pytest.mark.parametrize("case", BAD_TEI_RERANKS)
def test_bad_tei_rerank_is_422_in_tei_shape(ce, case):
    body, names = BAD_TEI_RERANKS[case]
    r = ce.post("/rerank", body)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == "Validation", r.text
    assert names in r.json()["error"], r.text


def test_tei_rerank_on_an_embedding_model_is_its_cosine(embedder):
    docs = DOCS[:5]
    ranks = tei_rerank(embedder, {"query": QUERY, "texts": docs, "return_text": True})
    cohere_shape = ok(embedder, "/rerank", {"query": QUERY, "documents": docs})["results"]
    assert [(r["index"], r["text"]) for r in ranks] == [(r["index"], r["document"]["text"]) for r in cohere_shape]
    np.testing.assert_allclose([r["score"] for r in ranks], [r["relevance_score"] for r in cohere_shape], atol=1e-6)
    r = embedder.post("/rerank", {"query": QUERY, "texts": docs, "raw_scores": True})
    assert r.status_code == 422 and "raw_scores" in r.json()["error"], r.text
