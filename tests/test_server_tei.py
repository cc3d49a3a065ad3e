"""text-embeddings-inference's routes (tp_embed/tei.py) on all-MiniLM-L6-v2 at tp = 2 (the server
tests/test_server.py also uses): huggingface_hub's InferenceClient, POST /embed and POST / in TEI's shapes,
GET /info, and TEI's error shape and statuses on bad input."""

import numpy as np
import pytest

from server_utils import cosine_rows
from tiny_models import MIXED_TEXTS, st_encode

TEXTS = MIXED_TEXTS[:6]


def test_huggingface_hub_feature_extraction(minilm, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    # the tests set HF_HUB_OFFLINE so nothing reaches the hub; this client talks to the local server only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(model=minilm.url)
    got = client.feature_extraction(TEXTS[0])
    assert got.shape[-1] == 384
    expected = st_encode(minilm.model_dir, TEXTS[:1])
    assert cosine_rows(got.reshape(1, -1).astype(np.float32), expected).min() >= 0.99999
    short = client.feature_extraction(TEXTS[0], dimensions=64, normalize=True)  # nested in "parameters"
    assert short.shape[-1] == 64 and abs(np.linalg.norm(short) - 1) < 1e-5
    # base_url= (the spelling, an alias of model= for a URL): the same route and vector
    by_base_url = InferenceClient(base_url=minilm.url).feature_extraction(TEXTS[0])
    assert np.array_equal(by_base_url, got)


@pytest.mark.parametrize("path", ["/embed", "/"])
def test_embed_in_tei_shape(minilm, path):
    r = minilm.post(path, {"inputs": TEXTS, "normalize": True, "truncate": False})
    assert r.status_code == 200, r.text
    vectors = np.array(r.json(), dtype=np.float32)
    assert vectors.shape == (len(TEXTS), 384)
    assert cosine_rows(vectors, st_encode(minilm.model_dir, TEXTS)).min() >= 0.99999
    one = minilm.post(path, {"inputs": TEXTS[1]}).json()  # a single string: a list of one vector
    assert len(one) == 1 and np.allclose(one[0], vectors[1], atol=1e-5)
    raw = np.array(minilm.post(path, {"inputs": TEXTS[:2], "normalize": False}).json())
    assert abs(np.linalg.norm(raw[0]) - 1) > 1e-3, "normalize false must return the raw pooled vector"


def test_info(minilm):
    r = minilm.get("/info")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256 and info["model_dtype"] == "float32"
    assert info["max_batch_tokens"] > 0 and info["max_client_batch_size"] == 2048


@pytest.mark.parametrize("body, status, names", [
    ({}, 422, "inputs"),
    ({"inputs": 5}, 422, "input"),
    ({"inputs": "x", "normalize": "yes"}, 422, "normalize"),
    ({"inputs": "x", "truncation_direction": "Middle"}, 422, "truncation_direction"),
    ({"inputs": "x", "unknown": 1}, 422, "unknown"),
    ({"inputs": "x", "dimensions": 1000}, 422, "dimensions"),
    ({"inputs": " ".join(["word"] * 600)}, 422, "256"),
])
def test_bad_input_gets_tei_errors(minilm, body, status, names):
    r = minilm.post("/embed", body)
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"error", "error_type"} and error["error_type"] == "Validation"
    assert names in error["error"], error


def test_oversized_body_is_413_in_tei_shape(minilm):
    r = minilm.post("/embed", {"inputs": "x" * (65 * 1024 * 1024)})  # past --max-request-bytes (64 MiB)
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error_type"] == "Validation"


def tokenize(server, body: dict) -> list:
    r = server.post("/tokenize", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_tokenize_in_tei_shape(minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm.model_dir)
    texts = ["Hello world", "naïve café, [SEP] déjà vu"]
    got = tokenize(minilm, {"inputs": texts})
    assert len(got) == 2
    for text, tokens in zip(texts, got):
        assert [t["id"] for t in tokens] == tokenizer(text)["input_ids"]
        assert all(set(t) == {"id", "text", "special", "start", "stop"} for t in tokens)
        first, *middle, last = tokens
        for special in (first, last):  # [CLS] and [SEP], added by the tokenizer
            assert special["special"] and special["start"] is None and special["stop"] is None
        assert [first["text"], last["text"]] == ["[CLS]", "[SEP]"]
        for t in middle:
            assert not t["special"] and t["text"] == text[t["start"]:t["stop"]] and t["text"]
    accented = [t for t in got[1] if not t["special"]]
    assert [t["text"] for t in accented][:2] == ["naïve", "café"]  # the input's characters, not the vocabulary's
    assert any(t["text"] == "[SEP]" and not t["special"] for t in accented)  # typed text, not an added token
    one = tokenize(minilm, {"inputs": texts[0], "add_special_tokens": False})  # a string: a list of one
    assert [[t["id"] for t in one[0]]] == [tokenizer(texts[0], add_special_tokens=False)["input_ids"]]
    assert not any(t["special"] for t in one[0])
    # SGLang's shape on the same route is unchanged
    assert minilm.post("/tokenize", {"prompt": texts[0]}).json()["tokens"] == tokenizer(texts[0])["input_ids"]


@pytest.mark.parametrize("body, names", [
    ({"prompt_name": None}, "inputs"),  # TEI's shape (prompt_name), without its inputs
    ({"inputs": []}, "inputs"),
    ({"inputs": ""}, "inputs"),
    ({"inputs": ["a", 3]}, "inputs"),
    ({"inputs": 5}, "inputs"),
    ({"inputs": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ({"inputs": "a", "prompt_name": "query"}, "prompt_name"),  # all-MiniLM-L6-v2 has no prompts
    ({"inputs": "a", "model": "x"}, "model"),
])
def test_bad_tokenize_gets_tei_errors(minilm, body, names):
    r = minilm.post("/tokenize", body)
    assert r.status_code == 422, r.text
    error = r.json()
    assert set(error) == {"error", "error_type"} and error["error_type"] == "Validation"
    assert names in error["error"], error


def test_tokenize_prepends_the_prompt_as_tei_does(minilm_dir):
    """TEI tokenizes prompt + input (prompt_name's prompt, else the model's default): the offsets index that
    string. Without a server: tei.tokenize on all-MiniLM-L6-v2's tokenizer with prompts of our own."""
    import json

    from tp_embed import tei
    from tp_embed.config import SentenceTransformersConfig
    from tp_embed.text import TextProcessor

    st = SentenceTransformersConfig(prompts={"query": "query: ", "passage": "passage: "}, default_prompt_name="passage")
    text = TextProcessor(minilm_dir, st, 512)
    ids = {name: text.tokenizer(prompt + "cats eat fish")["input_ids"] for name, prompt in st.prompts.items()}
    for body, prompt in (({"prompt_name": "query"}, "query: "), ({}, "passage: ")):
        [tokens] = tei.tokenize(json.dumps({"inputs": "cats eat fish", **body}).encode(), text)
        assert [t["id"] for t in tokens] == ids[prompt.rstrip(": ")]
        words = [t for t in tokens if not t["special"]]
        assert words[0]["start"] == 0 and words[0]["text"] == prompt.rstrip(": ")
        assert [(t["start"], t["text"]) for t in words[-3:]] == [(len(prompt), "cats"), (len(prompt) + 5, "eat"),
                                                                  (len(prompt) + 9, "fish")]
