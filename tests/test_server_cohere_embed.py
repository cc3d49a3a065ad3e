"""Cohere's POST /v2/embed (tp_embed/cohere_embed.py) on all-MiniLM-L6-v2 at tp = 2 (the server
tests/test_server.py also uses): the official `cohere` client's embed with every embedding type, the
binary types against sentence-transformers' quantize_embeddings, int8/uint8 as docs/api.md defines them,
and 400s for what it does not take."""

import base64

import cohere
import numpy as np
import pytest

from server_utils import cosine_rows
from tiny_models import MIXED_TEXTS, st_encode

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # the default model's served name
TEXTS = MIXED_TEXTS[:6]
TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


@pytest.fixture(scope="module")
def embedded(minilm):
    client = cohere.ClientV2(base_url=minilm.url, api_key="unused")
    response = client.embed(model=MINILM_NAME, texts=TEXTS, input_type="search_document", embedding_types=TYPES)
    return response, np.array(response.embeddings.float_, dtype=np.float32)


def test_float_matches_sentence_transformers(embedded, minilm):
    response, vectors = embedded
    assert vectors.shape == (len(TEXTS), 384) and response.texts == TEXTS
    assert cosine_rows(vectors, st_encode(minilm.model_dir, TEXTS)).min() >= 0.99999
    assert response.meta.billed_units.input_tokens > len(TEXTS)


@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_binary_types_equal_sentence_transformers(embedded, kind):
    from sentence_transformers.util.quantization import quantize_embeddings

    response, vectors = embedded
    got = np.array(getattr(response.embeddings, kind))
    expected = quantize_embeddings(vectors, precision=kind)
    assert got.shape == (len(TEXTS), 384 // 8) and np.array_equal(got, expected)


def test_int8_and_uint8_scale_each_vector_by_its_largest_component(embedded):
    response, vectors = embedded
    unit = vectors / np.abs(vectors).max(axis=1, keepdims=True)
    int8, uint8 = np.array(response.embeddings.int8), np.array(response.embeddings.uint8)
    assert np.abs(int8 - np.rint(unit * 127)).max() <= 1 and np.abs(int8).max() == 127
    assert np.abs(uint8 - np.rint((unit + 1) * 127.5)).max() <= 1 and uint8.min() >= 0 and uint8.max() <= 255
    assert cosine_rows(int8.astype(np.float32), vectors).min() > 0.999  # what a vector store keeps


def test_base64_is_the_float32_bytes(embedded):
    response, vectors = embedded
    decoded = np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in response.embeddings.base64])
    assert np.array_equal(decoded, vectors)


def test_inputs_and_output_dimension(minilm):
    body = {"model": MINILM_NAME, "inputs": [{"content": [{"type": "text", "text": t}]} for t in TEXTS[:2]],
            "input_type": "search_query", "output_dimension": 64}
    r = minilm.post("/v2/embed", body)
    assert r.status_code == 200, r.text
    vectors = np.array(r.json()["embeddings"]["float"])
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("body, param", [
    ({"texts": ["x"], "truncate": "START"}, "truncate"),
    ({"texts": ["x"], "max_tokens": 10}, "max_tokens"),
    ({"texts": ["x"], "embedding_types": ["int4"]}, "embedding_types.0"),
    ({"texts": ["x"], "images": ["data:image/png;base64,AA=="]}, "texts"),
    ({"images": ["data:image/png;base64,AA=="]}, "images"),
    ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "inputs[0]"),
    ({"texts": [" ".join(["word"] * 600)], "truncate": "NONE"}, "input"),
    ({"texts": ["x"], "input_type": "search"}, "input_type"),
])
def test_bad_requests_are_400(minilm, body, param):
    r = minilm.post("/v2/embed", {"model": MINILM_NAME, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
