"""Cohere's POST /v2/embed (tp_embed/cohere_embed.py) on all-MiniLM-L6-v2 at tp = 2 (the server
tests/test_server.py also uses): the official `cohere` client's embed with every embedding type, the
binary types against sentence-transformers' quantize_embeddings, int8/uint8 as docs/api.md defines them,
and 400s for what it does not take; and, on a server of its own at tp = 1, int8/uint8 calibrated by
--embedding-calibration against quantize_embeddings, with the calibration file's checks."""

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
    ({"texts": ["x"], "truncate": "MIDDLE"}, "truncate"),
    ({"texts": ["x"], "max_tokens": 0}, "max_tokens"),
    ({"texts": ["x"], "embedding_types": ["int4"]}, "embedding_types.0"),
    ({"texts": ["x"], "images": ["data:image/png;base64,AA=="]}, "texts"),
    ({"images": ["data:image/png;base64,AA=="]}, "input"),  # all-MiniLM-L6-v2 embeds text only
    ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "input"),
    ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "x"}},
                              {"type": "image_url", "image_url": {"url": "y"}}]}]}, "inputs[0]"),
    ({"inputs": [{"content": [{"type": "audio", "audio": "x"}]}]}, "inputs[0]"),
    ({"images": ["data:image/png;base64,AA=="], "max_tokens": 5}, "max_tokens"),
    ({"texts": [" ".join(["word"] * 600)], "truncate": "NONE"}, "input"),
    ({"texts": ["x"], "input_type": "search"}, "input_type"),
])
def test_bad_requests_are_400(minilm, body, param):
    r = minilm.post("/v2/embed", {"model": MINILM_NAME, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


# ---- int8 and uint8 calibrated by --embedding-calibration ----

CALIBRATION_TEXTS = MIXED_TEXTS[6:]  # not the texts embedded below, so that some components fall outside


@pytest.fixture(scope="module")
def calibrated(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 at tp = 1 with --embedding-calibration: the sentence-transformers embeddings of
    CALIBRATION_TEXTS [14, 384]."""
    from server_utils import ServerProcess

    d = tmp_path_factory.mktemp("calibration")
    calibration = st_encode(minilm_dir, CALIBRATION_TEXTS)
    np.save(d / "calibration.npy", calibration)
    args = ["--tp", "1", "--embedding-calibration", str(d / "calibration.npy"),
            "--json-model-override-args", '{"is_matryoshka": true}']
    with ServerProcess(args, nproc=1, log_path=d / "server.log") as server:
        server.calibration = calibration
        yield server


@pytest.mark.parametrize("output_dimension", [None, 64])
def test_calibrated_int8_and_uint8_equal_sentence_transformers(calibrated, output_dimension):
    from sentence_transformers.util.quantization import quantize_embeddings

    client = cohere.ClientV2(base_url=calibrated.url, api_key="unused")
    kw = {} if output_dimension is None else {"output_dimension": output_dimension}
    response = client.embed(model=MINILM_NAME, texts=TEXTS, input_type="search_document",
                            embedding_types=["float", "int8", "uint8", "ubinary"], **kw)
    vectors = np.array(response.embeddings.float_, dtype=np.float32)
    d = output_dimension or 384
    assert vectors.shape == (len(TEXTS), d)
    ranges = np.vstack((calibrated.calibration.min(0), calibrated.calibration.max(0)))[:, :d]
    for kind in ("int8", "uint8"):
        got = np.array(getattr(response.embeddings, kind))
        assert np.array_equal(got, quantize_embeddings(vectors, precision=kind, ranges=ranges)), kind
        if output_dimension is None:  # the ranges are the calibration embeddings' own
            expected = quantize_embeddings(vectors, precision=kind, calibration_embeddings=calibrated.calibration)
            assert np.array_equal(got, expected), kind
    int8 = np.array(response.embeddings.int8)
    assert int8.min() == -128 and int8.max() == 127  # components outside the calibration's ranges are clipped
    assert np.array_equal(np.array(response.embeddings.ubinary), quantize_embeddings(vectors, precision="ubinary"))


def write_npy(tmp_path, array) -> str:
    path = str(tmp_path / "calibration.npy")
    np.save(path, array)
    return path


def test_load_calibration_reads_ranges_or_embeddings(tmp_path):
    from sentence_transformers.util.quantization import quantize_embeddings

    from tp_embed.cohere_embed import load_calibration, quantize

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((40, 24))  # float64, as a user may save them
    vectors = (rng.standard_normal((9, 24)) * 1.2).astype(np.float32)
    from_embeddings = load_calibration(write_npy(tmp_path, embeddings))
    assert from_embeddings.dtype == np.float32 and from_embeddings.shape == (2, 24)
    ranges = np.vstack((embeddings.min(0), embeddings.max(0)))
    assert np.array_equal(load_calibration(write_npy(tmp_path, ranges)), from_embeddings)
    assert load_calibration(None) is None
    for kind in ("int8", "uint8"):
        expected = quantize_embeddings(vectors, precision=kind, calibration_embeddings=embeddings)
        assert np.array_equal(np.array(quantize(vectors, kind, from_embeddings)), expected)
        assert np.array_equal(np.array(quantize(vectors[:, :8], kind, from_embeddings)),
                              quantize_embeddings(vectors[:, :8], precision=kind, ranges=ranges[:, :8]))
    constant = np.zeros((2, 24))  # max = min: sentence-transformers' step of 1
    assert np.array_equal(np.array(quantize(vectors, "uint8", load_calibration(write_npy(tmp_path, constant)))),
                          quantize_embeddings(vectors, precision="uint8", ranges=constant))


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"not numpy", "not a readable .npy file"),
    (np.zeros(8), "shape [8]"),
    (np.zeros((1, 8)), "shape [1, 8]"),
    (np.zeros((3, 4, 2)), "shape [3, 4, 2]"),
    (np.zeros((3, 0)), "shape [3, 0]"),
    (np.zeros((5, 8), dtype=np.int32), "int32"),
    (np.array([[0.0, 1.0], [1.0, 0.5]]), "dimension 1 has 1.0 above 0.5"),
    (np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]]), "not finite"),
    (np.array([[0.0, 1e39], [1.0, 1e40]]), "not finite"),
    ("npz", "an .npz archive"),
])
def test_a_calibration_file_it_cannot_use_is_named(tmp_path, content, message):
    from tp_embed.cohere_embed import load_calibration
    from tp_embed.errors import ConfigError

    path = str(tmp_path / "calibration.npy")
    if isinstance(content, bytes):
        (tmp_path / "calibration.npy").write_bytes(content)
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    elif content == "npz":
        np.savez(str(tmp_path / "calibration.npz"), ranges=np.zeros((2, 8)))
        path = str(tmp_path / "calibration.npz")
    with pytest.raises(ConfigError, match="--embedding-calibration") as e:
        load_calibration(path)
    assert message in str(e.value)


def test_check_calibration_names_both_sizes():
    from tp_embed.cohere_embed import check_calibration
    from tp_embed.errors import ConfigError

    ranges = np.zeros((2, 100), dtype=np.float32)
    check_calibration(ranges, "c.npy", "m", 100)
    with pytest.raises(ConfigError, match="c.npy has 100 dimensions, but m returns 384-dimensional embeddings"):
        check_calibration(ranges, "c.npy", "m", 384)
    with pytest.raises(ConfigError, match="m does not embed"):
        check_calibration(ranges, "c.npy", "m", None)


def test_a_calibration_file_that_does_not_fit_the_model_fails_startup(tmp_path):
    """At tp 2: rank 0 says why in one line, stops the workers and exits; no request is ever served."""
    import tiny_models as tm
    from server_utils import ServerProcess

    model = tm.make_bert(str(tmp_path / "bert"))  # 64-dimensional embeddings
    path = write_npy(tmp_path, np.zeros((2, 384), dtype=np.float32))
    with pytest.raises(RuntimeError, match="server exited"):
        with ServerProcess(["--model-path", model, "--tp", "2", "--embedding-calibration", path], nproc=2,
                           log_path=tmp_path / "server.log"):
            pass
    log = (tmp_path / "server.log").read_text()
    assert f"--embedding-calibration {path} has 384 dimensions, but" in log
    assert "returns 64-dimensional embeddings" in log, log[-3000:]
    assert "lost the process group" not in log, log[-3000:]
    missing = str(tmp_path / "missing.npy")
    with pytest.raises(RuntimeError, match=f"--embedding-calibration {missing}: no such file"):
        with ServerProcess(["--model-path", model, "--embedding-calibration", missing], nproc=1,
                           log_path=tmp_path / "missing.log"):
            pass
