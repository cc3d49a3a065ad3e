"""The real server under torchrun at tp=2 (gloo, CPU), on a tiny random decoder and on all-MiniLM-L6-v2,
checked against sentence-transformers and the offline engine, through the official openai client and
raw httpx."""

import asyncio
import json
import random
import time

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from server_utils import ServerProcess, cosine_rows, response_vectors
from tiny_models import MIXED_TEXTS, st_encode, transformers_embeddings

API_KEY = "sk-test-0123456789"
TINY_NAME = "tiny-mistral"
TINY_DIMS = [16, 32, 64]
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def tiny(tiny_mistral_dir, tmp_path_factory):
    """tp=2, with an API key, a served name, Matryoshka dimensions and a short collective timeout (5 s)
    that only heartbeats keep an idle worker inside."""
    log = tmp_path_factory.mktemp("logs") / "tiny.log"
    args = ["--model-path", tiny_mistral_dir, "--tp", "2", "--served-model-name", TINY_NAME,
            "--json-model-override-args", json.dumps({"matryoshka_dimensions": TINY_DIMS}), "--dist-timeout", "5"]
    with ServerProcess(args, nproc=2, log_path=log, api_key=API_KEY) as server:
        server.model_dir = tiny_mistral_dir
        yield server


def offline_vectors(model_dir: str, texts: list[str], tmp_path) -> np.ndarray:
    """The offline entry point (tp_embed.offline, tp=1, in this process) on the same texts."""
    from tp_embed.offline import main
    inp, out = tmp_path / "texts.jsonl", tmp_path / "out.npy"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["--model-path", model_dir, "--input", str(inp), "--output", str(out)]) == 0
    return np.load(out)


def served_name(server) -> str:
    return TINY_NAME if server.api_key else MINILM_NAME


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_openai_client_matches_sentence_transformers_and_offline(which, request, tmp_path):
    server = request.getfixturevalue(which)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key or "unused", max_retries=0)
    texts = MIXED_TEXTS
    response = client.embeddings.create(model=served_name(server), input=texts)  # base64 by default
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert [d.index for d in response.data] == list(range(len(texts)))
    assert response.model == served_name(server)
    expected_st = st_encode(server.model_dir, texts)
    expected_offline = offline_vectors(server.model_dir, texts, tmp_path)
    assert cosine_rows(got, expected_st).min() >= 0.99999
    assert cosine_rows(got, expected_offline).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    num_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert response.usage.prompt_tokens == response.usage.total_tokens == num_tokens
    single = client.embeddings.create(model=served_name(server), input=texts[5])
    assert len(single.data) == 1
    assert cosine_rows(np.array([single.data[0].embedding]), expected_st[5:6]).min() >= 0.99999


@pytest.mark.parametrize("which, dims", [("tiny", 32), ("minilm", 128)])
def test_float_encoding_and_dimensions_over_httpx(which, dims, request):
    server = request.getfixturevalue(which)
    texts = MIXED_TEXTS[:7]
    expected = st_encode(server.model_dir, texts)
    r = server.post("/v1/embeddings", {"input": texts, "model": served_name(server), "encoding_format": "float"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == served_name(server)
    assert all(isinstance(x, float) for x in body["data"][0]["embedding"])
    assert cosine_rows(response_vectors(body), expected).min() >= 0.99999
    r = server.post("/v1/embeddings", {"input": texts, "dimensions": dims, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    short = response_vectors(r.json())
    assert short.shape == (len(texts), dims)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    assert cosine_rows(short, expected[:, :dims]).min() >= 0.99999
    r = server.post("/v1/embeddings", {"input": texts, "dimensions": dims, "encoding_format": "base64"})
    np.testing.assert_array_equal(response_vectors(r.json()), short)  # same float32 values either way


def test_a_request_larger_than_a_batch_comes_back_in_input_order(tiny):
    texts = [MIXED_TEXTS[(i * 7) % len(MIXED_TEXTS)] for i in range(600)]  # > 8192 tokens: several batches
    batches = tiny.metric("tp_embed_batch_forward_seconds_count")
    r = tiny.post("/v1/embeddings", {"input": texts, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    assert tiny.metric("tp_embed_batch_forward_seconds_count") - batches >= 2
    reference = st_encode(tiny.model_dir, MIXED_TEXTS)
    expected = reference[[(i * 7) % len(MIXED_TEXTS) for i in range(600)]]
    assert cosine_rows(response_vectors(r.json()), expected).min() >= 0.99999


def test_token_id_inputs_equal_text_inputs(tiny):
    texts = MIXED_TEXTS[:4]
    ids = AutoTokenizer.from_pretrained(tiny.model_dir)(texts)["input_ids"]
    by_text = tiny.post("/v1/embeddings", {"input": texts}).json()
    by_ids = tiny.post("/v1/embeddings", {"input": ids}).json()
    one = tiny.post("/v1/embeddings", {"input": ids[2]}).json()
    np.testing.assert_allclose(response_vectors(by_ids), response_vectors(by_text), atol=1e-6)
    np.testing.assert_allclose(response_vectors(one)[0], response_vectors(by_text)[2], atol=1e-6)
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert one["usage"]["prompt_tokens"] == len(ids[2])


def test_extensions_prompt_name_normalize_truncate(tiny):
    texts = MIXED_TEXTS[:5]
    r = tiny.post("/v1/embeddings", {"input": texts, "prompt_name": "query"})
    expected = st_encode(tiny.model_dir, texts, prompt_name="query")
    assert cosine_rows(response_vectors(r.json()), expected).min() >= 0.99999
    r = tiny.post("/v1/embeddings", {"input": texts, "normalize": False, "encoding_format": "float"})
    raw = response_vectors(r.json())
    expected_raw = transformers_embeddings(tiny.model_dir, texts, normalize=False)
    np.testing.assert_allclose(raw, expected_raw, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    long_text = "the quick brown fox jumps over the lazy dog " * 60  # > 256 tokens
    r = tiny.post("/v1/embeddings", {"input": [long_text, "short"], "truncate": True})
    assert r.status_code == 200, r.text
    expected = st_encode(tiny.model_dir, [long_text, "short"])  # sentence-transformers truncates at 256
    assert cosine_rows(response_vectors(r.json()), expected).min() >= 0.99999
    short_tokens = len(AutoTokenizer.from_pretrained(tiny.model_dir)("short")["input_ids"])
    assert r.json()["usage"]["prompt_tokens"] == 256 + short_tokens


LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 60


# (id, JSON body or raw bytes, extra headers, status, code, param, substrings of the message);
# "{n_long}" stands for the token count of LONG_TEXT.
BAD_REQUESTS = [
    ("empty list", {"input": []}, None, 400, None, "input", ["empty list"]),
    ("empty string", {"input": ""}, None, 400, None, "input", ["empty string"]),
    ("empty string in list", {"input": ["a", ""]}, None, 400, None, "input", ["input[1]", "empty string"]),
    ("empty token list", {"input": [[1, 2], []]}, None, 400, None, "input", ["input[1]", "empty"]),
    ("mixed list", {"input": ["a", 5]}, None, 400, None, "input", ["input[1]"]),
    ("object input", {"input": {"text": "a"}}, None, 400, None, "input", ["an object"]),
    ("null input", {"input": None}, None, 400, None, "input", ["null"]),
    ("bool token", {"input": [True, 5]}, None, 400, None, "input", ["a boolean"]),
    ("float token id", {"input": [5, 2.5]}, None, 400, None, "input", ["input[1]", "2.5", "not a token id"]),
    ("string token id", {"input": [[5, "7"]]}, None, 400, None, "input", ["input[0][1]", "not a token id"]),
    ("negative token id", {"input": [[5], [3, -1]]}, None, 400, None, "input", ["input[1][1]", "-1", "1002"]),
    ("token id out of vocab", {"input": [1003]}, None, 400, None, "input", ["1003", "0 to 1002"]),
    ("too many inputs", {"input": ["a"] * 2049}, None, 400, None, "input", ["2049", "2048"]),
    ("too many token lists", {"input": [[1]] * 2049}, None, 400, None, "input", ["2049", "2048"]),
    ("text over context length", {"input": ["ok", LONG_TEXT]}, None, 400, "context_length_exceeded", "input",
     ["{n_long} tokens", "256 tokens", "input 1"]),
    ("tokens over context length", {"input": list(range(300))}, None, 400, "context_length_exceeded", "input",
     ["300 tokens", "256 tokens"]),
    ("truncate false", {"input": LONG_TEXT, "truncate": False}, None, 400, "context_length_exceeded", "input",
     ["{n_long} tokens"]),
    ("dimensions not listed", {"input": "a", "dimensions": 20}, None, 400, None, "dimensions", ["20", "[16, 32, 64]"]),
    ("dimensions zero", {"input": "a", "dimensions": 0}, None, 400, None, "dimensions", ["0"]),
    ("dimensions string", {"input": "a", "dimensions": "32"}, None, 400, None, "dimensions", ["integer"]),
    ("encoding format", {"input": "a", "encoding_format": "int8"}, None, 400, None, "encoding_format",
     ["'int8'", "base64"]),
    ("unknown field", {"input": "a", "dimension": 32}, None, 400, None, "dimension", ["unrecognized", "dimension"]),
    ("missing input", {"model": TINY_NAME}, None, 400, None, "input", ["'input'", "required"]),
    ("normalize not bool", {"input": "a", "normalize": "yes"}, None, 400, None, "normalize", ["boolean"]),
    ("unknown prompt", {"input": "a", "prompt_name": "passage"}, None, 400, None, "prompt_name", ["passage", "query"]),
    ("prompt with token ids", {"input": [1, 2], "prompt_name": "query"}, None, 400, None, "prompt_name",
     ["text inputs"]),
    ("malformed json", b'{"input": "a",', None, 400, "invalid_json", None, ["not valid JSON"]),
    ("json not an object", b'["a"]', None, 400, "invalid_json", None, ["JSON object"]),
    ("unknown model", {"input": "a", "model": "gpt-4"}, None, 404, "model_not_found", "model", ["gpt-4", TINY_NAME]),
    ("no api key", {"input": "a"}, {"Authorization": ""}, 401, "invalid_api_key", None, ["Bearer"]),
    ("wrong api key", {"input": "a"}, {"Authorization": "Bearer sk-wrong"}, 401, "invalid_api_key", None,
     ["incorrect"]),
]


def send_bad_request(server, body, headers) -> httpx.Response:
    if isinstance(body, bytes):
        return server.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    return server.post("/v1/embeddings", body, headers=headers or {})


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(case, tiny):
    _, body, headers, status, code, param, substrings = case
    n_long = len(AutoTokenizer.from_pretrained(tiny.model_dir)(LONG_TEXT)["input_ids"])
    r = send_bad_request(tiny, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param), error
    for s in substrings:
        assert s.format(n_long=n_long) in error["message"], (s, error["message"])
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_bad_requests_never_reach_the_engine(tiny):
    batches = tiny.metric("tp_embed_batch_forward_seconds_count")
    for _, body, headers, status, *_ in BAD_REQUESTS:
        assert send_bad_request(tiny, body, headers).status_code == status
    assert tiny.metric("tp_embed_batch_forward_seconds_count") == batches
    assert tiny.metric("tp_embed_errors_total", 'code="context_length_exceeded",status="400"') >= 3
    r = tiny.post("/v1/embeddings", {"input": ["still", "serving"], "model": TINY_NAME})
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_long_inputs_leave_no_tokenizer_warning_in_the_log(tiny):
    # transformers warns once per tokenizer that a sequence over model_max_length "will result in indexing
    # errors"; the server measures lengths itself and answers 400 (or truncates), so the warning would only
    # mislead whoever reads the log
    assert tiny.post("/v1/embeddings", {"input": LONG_TEXT, "model": TINY_NAME}).status_code == 400
    assert tiny.post("/tokenize", {"prompt": LONG_TEXT}).json()["count"] > 256
    assert "Token indices sequence length" not in tiny.log()


def test_routes_and_api_key(tiny):
    r = httpx.get(tiny.url + "/health")  # the one route without a key
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    for method, path in [("GET", "/v1/models"), ("GET", f"/v1/models/{TINY_NAME}"), ("GET", "/metrics"),
                         ("POST", "/tokenize"), ("POST", "/v1/embeddings")]:
        r = httpx.request(method, tiny.url + path, json={"prompt": "a"})
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    models = tiny.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [TINY_NAME]
    assert models["data"][0]["max_model_len"] == 256
    assert tiny.get(f"/v1/models/{TINY_NAME}").json()["id"] == TINY_NAME
    assert tiny.get("/v1/models/other").status_code == 404
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    r = tiny.post("/tokenize", {"prompt": "naïve café"}).json()
    assert r["tokens"] == tokenizer("naïve café")["input_ids"] and r["count"] == len(r["tokens"])
    r = tiny.post("/tokenize", {"prompt": ["a b", "c"], "add_special_tokens": False}).json()
    assert r["tokens"] == tokenizer(["a b", "c"], add_special_tokens=False)["input_ids"]
    assert r["count"] == [len(t) for t in r["tokens"]] and r["max_model_len"] == 256
    r = tiny.get("/no/such/route")
    assert r.status_code == 404 and "/no/such/route" in r.json()["error"]["message"]
    r = tiny.get("/v1/embeddings")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    text = tiny.get("/metrics").text
    for name in ["tp_embed_requests_total", "tp_embed_inputs_total", "tp_embed_prompt_tokens_total",
                 "tp_embed_batch_requests_bucket", "tp_embed_batch_tokens_bucket", "tp_embed_queue_depth",
                 "tp_embed_request_latency_seconds_bucket", "tp_embed_errors_total", "tp_embed_queued_tokens"]:
        assert name in text, name
    assert tiny.metric("tp_embed_requests_total", 'route="/v1/embeddings",status="401"') >= 1


def test_idle_server_keeps_serving_past_the_collective_timeout(tiny):
    # --dist-timeout 5: without heartbeats the worker's broadcast would time out and the job would die
    time.sleep(8)
    r = tiny.post("/v1/embeddings", {"input": "after a long idle"})
    assert r.status_code == 200, r.text
    assert httpx.get(tiny.url + "/health").status_code == 200


def test_concurrent_clients_get_every_response_in_order(tiny):
    # short texts: the CPU attention pads every batch to its longest input
    texts = [f"{t} #{i}" for i in range(5) for t in MIXED_TEXTS if len(t) < 80]
    expected = st_encode(tiny.model_dir, texts)
    batched_before = (tiny.metric("tp_embed_batch_requests_count")
                      - tiny.metric("tp_embed_batch_requests_bucket", 'le="1.0"'))

    async def client(c: httpx.AsyncClient, seed: int) -> int:
        rng = random.Random(seed)
        checked = 0
        for i in range(20):
            picks = [rng.randrange(len(texts)) for _ in range(rng.randint(1, 64))]
            fmt = "base64" if (seed + i) % 2 else "float"
            r = await c.post("/v1/embeddings", json={"input": [texts[k] for k in picks], "encoding_format": fmt})
            assert r.status_code == 200, r.text
            got = response_vectors(r.json())
            assert got.shape == (len(picks), 64)
            assert cosine_rows(got, expected[picks]).min() >= 0.99999
            checked += 1
        return checked

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=tiny.url, headers=tiny.headers, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(client(c, seed) for seed in range(32)))

    assert sum(asyncio.run(main())) == 32 * 20
    batched = tiny.metric("tp_embed_batch_requests_count") - tiny.metric("tp_embed_batch_requests_bucket", 'le="1.0"')
    assert batched > batched_before, "no batch held inputs of more than one request"
