"""Tests for benchmarks/bench_serving.py: pure arithmetic, CLI parsing, and
end-to-end runs against a fake OpenAI embeddings server on loopback, and (--mode rerank)
against fake rerank servers, well-behaved and not."""

import base64
import hashlib
import io
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# benchmarks/ is a folder of scripts, not a package: import the way its sibling
# scripts (compare.py) do, by putting the folder on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_serving as bs  # noqa: E402

DIM = 16
MODEL = "fake-embed"


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------

def test_percentiles_on_known_data():
    values = list(range(1, 101))  # 1..100
    assert bs.percentiles(values) == pytest.approx({50: 50.5, 90: 90.1, 99: 99.01})
    assert bs.percentiles([7.0]) == {50: 7.0, 90: 7.0, 99: 7.0}
    assert bs.percentiles([]) == {50: None, 90: None, 99: None}


def test_summarise_known_rates():
    ok = [bs.RequestRecord(start_s=i * 0.1, latency_s=(i + 1) / 100, num_inputs=4, prompt_tokens=100)
          for i in range(10)]  # latencies 10..100 ms
    errors = [bs.RequestRecord(start_s=0.0, latency_s=0.001, num_inputs=4, error="500"),
              bs.RequestRecord(start_s=0.0, latency_s=0.001, num_inputs=4, error="500"),
              bs.RequestRecord(start_s=0.0, latency_s=0.002, num_inputs=4, error="ConnectError")]
    s = bs.summarise(ok + errors, wall_time=2.0)
    assert s["num_requests"] == 13 and s["num_ok"] == 10 and s["num_errors"] == 3
    assert s["errors"] == {"500": 2, "ConnectError": 1}
    assert s["requests_per_s"] == pytest.approx(5.0)
    assert s["inputs_per_s"] == pytest.approx(20.0)
    assert s["tokens_per_s"] == pytest.approx(500.0)
    assert s["prompt_tokens"] == 1000
    # Latency is over successful requests only.
    assert s["latency_p50_ms"] == pytest.approx(55.0)
    assert s["latency_p99_ms"] == pytest.approx(99.1)
    assert s["latency_mean_ms"] == pytest.approx(55.0)
    assert s["mismatches"] is None and s["min_cosine"] is None  # nothing checked


def test_summarise_without_usage_and_with_checks():
    records = [bs.RequestRecord(0.0, 0.01, 2, checked=2, mismatches=0, min_cosine=0.99999),
               bs.RequestRecord(0.0, 0.02, 2, checked=2, mismatches=1, min_cosine=0.5)]
    s = bs.summarise(records, wall_time=1.0)
    assert s["tokens_per_s"] is None and s["requests_without_usage"] == 2
    assert s["checked_vectors"] == 4 and s["mismatches"] == 1 and s["min_cosine"] == 0.5
    empty = bs.summarise([], wall_time=0.0)
    assert empty["requests_per_s"] is None and empty["latency_p50_ms"] is None


def test_base64_decode_round_trip():
    vector = np.random.default_rng(0).standard_normal(33).astype(np.float32)
    encoded = base64.b64encode(vector.astype("<f4").tobytes()).decode()
    np.testing.assert_array_equal(bs.decode_embedding(encoded), vector)
    np.testing.assert_array_equal(bs.decode_embedding(vector.tolist()), vector)
    with pytest.raises(ValueError):
        bs.decode_embedding(base64.b64encode(b"\x00" * 6).decode())  # not whole float32s


def test_decode_response_places_rows_by_index_and_rejects_bad_bodies():
    payload = {"data": [{"index": 1, "embedding": [1.0, 1.0]}, {"index": 0, "embedding": [0.0, 0.0]}]}
    np.testing.assert_array_equal(bs.decode_response(payload, 2), [[0, 0], [1, 1]])
    with pytest.raises(bs.BadResponse, match="count"):
        bs.decode_response(payload, 3)
    with pytest.raises(bs.BadResponse, match="index"):
        bs.decode_response({"data": [{"index": 0, "embedding": [0.0]}, {"index": 0, "embedding": [1.0]}]}, 2)
    with pytest.raises(bs.BadResponse, match="dimension"):
        bs.decode_response({"data": [{"index": 0, "embedding": [0.0]}, {"index": 1, "embedding": [1.0, 2.0]}]}, 2)
    with pytest.raises(bs.BadResponse, match="format"):
        bs.decode_response({"object": "error"}, 1)


DOCS = ["d0", "d1", "d2", "d3"]


def results(*pairs, documents=None):
    return {"id": "r", "model": MODEL, "usage": {"total_tokens": 9},
            "results": [{"index": i, "relevance_score": v} | ({"document": documents[i]} if documents else {})
                        for i, v in pairs]}


def test_decode_rerank_response_accepts_the_contract():
    assert bs.decode_rerank_response(results((2, 0.9), (0, 0.5), (3, 0.5), (1, -3)), DOCS) == [
        (2, 0.9), (0, 0.5), (3, 0.5), (1, -3.0)]  # ties allowed, ints are scores too
    assert bs.decode_rerank_response(results((1, 0.7), (3, 0.1)), DOCS, top_n=2) == [(1, 0.7), (3, 0.1)]
    assert len(bs.decode_rerank_response(results((1, 0.7), (0, 0.1)), DOCS[:2], top_n=9)) == 2  # top_n > N: all
    with_text = results((1, 0.7), (0, 0.1), documents=[{"text": "d0"}, {"text": "d1"}])
    assert bs.decode_rerank_response(with_text, DOCS[:2], return_documents=True) == [(1, 0.7), (0, 0.1)]
    bare = results((1, 0.7), (0, 0.1), documents=["d0", "d1"])  # Infinity's form
    assert bs.decode_rerank_response(bare, DOCS[:2], return_documents=True) == [(1, 0.7), (0, 0.1)]
    assert bs.expected_rerank_results(5) == 5 and bs.expected_rerank_results(5, 0) == 5  # vLLM: 0 means all
    assert bs.expected_rerank_results(5, 2) == 2 and bs.expected_rerank_results(5, True) == 5


@pytest.mark.parametrize("payload, documents, kwargs, reason", [
    ({"error": {"message": "no"}}, DOCS, {}, "format"),
    ({"results": {"index": 0}}, DOCS, {}, "format"),
    ({"results": [{"index": 0}]}, DOCS[:1], {}, "format"),
    ([], DOCS, {}, "format"),
    (results((0, 0.9), (1, 0.8), (2, 0.7)), DOCS, {}, "count"),  # one result missing
    (results((0, 0.9), (1, 0.8), (2, 0.7), (3, 0.6)), DOCS, {"top_n": 2}, "count"),  # top_n ignored
    (results((0, 0.9), (0, 0.8), (2, 0.7), (3, 0.6)), DOCS, {}, "index"),  # duplicate
    (results((0, 0.9), (4, 0.8), (2, 0.7), (3, 0.6)), DOCS, {}, "index"),  # out of range
    (results((0, 0.9), (-1, 0.8)), DOCS[:2], {}, "index"),
    (results((0, 0.9), (True, 0.8)), DOCS[:2], {}, "index"),
    (results((0, 0.9), ("1", 0.8)), DOCS[:2], {}, "index"),
    (results((0, math.nan), (1, 0.8)), DOCS[:2], {}, "score"),
    (results((0, math.inf), (1, 0.8)), DOCS[:2], {}, "score"),
    (results((0, "0.9"), (1, 0.8)), DOCS[:2], {}, "score"),
    (results((0, 0.1), (1, 0.8)), DOCS[:2], {}, "order"),  # ascending
    (results((0, 0.9), (1, 0.8), (2, 0.85)), DOCS[:3], {}, "order"),
    (results((0, 0.9), (1, 0.8)), DOCS[:2], {"return_documents": True}, "document"),  # none returned
    (results((0, 0.9), (1, 0.8), documents=[{"text": "d1"}, {"text": "d0"}]), DOCS[:2],
     {"return_documents": True}, "document"),  # swapped
])
def test_decode_rerank_response_rejects(payload, documents, kwargs, reason):
    with pytest.raises(bs.BadResponse) as exc:
        bs.decode_rerank_response(payload, documents, **kwargs)
    assert str(exc.value) == reason


def test_usage_tokens():
    both = {"usage": {"prompt_tokens": 3, "total_tokens": 7}}
    assert bs.usage_tokens(both) == 3 and bs.usage_tokens(both, "rerank") == 7
    assert bs.usage_tokens({"usage": {"prompt_tokens": 3}}, "rerank") == 3  # only prompt_tokens given
    assert bs.usage_tokens({"usage": {"total_tokens": 7}}) is None  # embed reads prompt_tokens only
    for payload in ({}, {"usage": None}, {"usage": {"total_tokens": "7"}}, {"usage": {"total_tokens": True}}):
        assert bs.usage_tokens(payload, "rerank") is None


def test_load_queries(tmp_path):
    queries = bs.load_queries(None, seed=0)
    assert queries == bs.load_queries(None, seed=0) and len(queries) == bs.DEFAULT_NUM_SYNTHETIC_QUERIES
    assert all(3 <= len(q.split()) <= 12 for q in queries)
    assert queries[:5] != bs.synthetic_texts(5, 3, 12, seed=0)  # not the documents' draw
    path = tmp_path / "q.txt"
    path.write_text("what is a cat\n\nwhere is the sea\n", encoding="utf-8")
    assert bs.load_queries(str(path)) == ["what is a cat", "where is the sea"]


def test_cosine_similarities():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(bs.cosine_similarities(a, b), [1.0, -1.0, 0.0])


def test_synthetic_texts_deterministic_and_within_bounds():
    texts = bs.synthetic_texts(200, 3, 9, seed=7)
    assert texts == bs.synthetic_texts(200, 3, 9, seed=7)
    assert texts != bs.synthetic_texts(200, 3, 9, seed=8)
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) == 3 and max(lengths) == 9  # bounds reached, never exceeded
    assert all(t[0].isupper() and t.endswith(".") for t in texts)  # sentences
    words = {w.strip(".,").lower() for t in texts for w in t.split()}
    assert words <= set(bs._COMMON_WORDS) and len(words) > 100
    with pytest.raises(ValueError):
        bs.synthetic_texts(1, 5, 4)


def test_synthetic_texts_tokenize_like_prose():
    # the real model's WordPiece tokenizer: about 1.15 tokens a word, as the docstring says
    from transformers import AutoTokenizer

    from tp_embed.model_path import default_model_dir
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    texts = bs.synthetic_texts(300, 5, 200, seed=0)
    num_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    num_words = sum(len(t.split()) for t in texts)
    assert 1.05 < num_tokens / num_words < 1.3


def test_request_indices_wrap_around():
    assert bs.request_indices(0, 3, 7) == [0, 1, 2]
    assert bs.request_indices(2, 3, 7) == [6, 0, 1]


def test_load_dataset_lines_and_jsonl(tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\nsecond text\n", encoding="utf-8")
    assert bs.load_dataset(str(lines)) == ["first text", "second text"]
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "a b"}\n{"text": "c", "id": 2}\n', encoding="utf-8")
    assert bs.load_dataset(str(jsonl)) == ["a b", "c"]


def test_parse_sweeps():
    args = bs.parse_args(["--inputs-per-request", "1,32", "--concurrency", "1,8",
                          "--request-rate", "inf,50", "--base-url", "http://h:1/v1/"])
    assert args.inputs_per_request == [1, 32]
    assert args.concurrency == [1, 8]
    assert args.request_rate == [math.inf, 50.0]
    assert args.num_requests == bs.DEFAULT_NUM_REQUESTS and args.duration is None
    assert args.base_url == "http://h:1"
    assert bs.parse_args(["--duration", "5"]).num_requests is None


def test_parse_modes():
    embed = bs.parse_args([])
    assert embed.mode == "embed" and embed.encoding_format == "float"  # embed mode as before
    rerank = bs.parse_args(["--mode", "rerank", "--inputs-per-request", "10,100", "--top-n", "3"])
    assert rerank.mode == "rerank" and rerank.rerank_path == "/v1/rerank" and rerank.inputs_per_request == [10, 100]
    assert rerank.encoding_format is None and rerank.top_n == 3 and rerank.return_documents is False
    assert bs.parse_args(["--mode", "rerank", "--rerank-path", "rerank"]).rerank_path == "/rerank"
    assert "documents per request" in bs.build_parser().format_help()


@pytest.mark.parametrize("argv, message", [
    (["--images", "synthetic:64"], "WIDTHxHEIGHT"),
    (["--images", "synthetic:0x5"], "WIDTHxHEIGHT"),
    (["--images", "/no/such/dir"], "is not a directory"),
    (["--images", "synthetic", "--dataset", "t.txt"], "alternatives"),
    (["--concurrency", "1,x"], "comma-separated integers"),
    (["--concurrency", "0"], ">= 1"),
    (["--request-rate", "-1"], "rates must be > 0"),
    (["--extra-body", "[1]"], "JSON object"),
    (["--extra-body", "{bad"], "not valid JSON"),
    (["--encoding-format", "int8"], "invalid choice"),
    (["--duration", "5", "--num-requests", "3"], "not allowed with"),
    (["--synthetic-min-words", "10", "--synthetic-max-words", "5"], "--synthetic-max-words must be"),
    (["--mode", "score"], "invalid choice"),
    (["--mode", "rerank", "--check", "ref.npy"], "--check is for --mode embed only"),
    (["--mode", "rerank", "--images", "synthetic"], "--images is for --mode embed only"),
    (["--mode", "rerank", "--dimensions", "8"], "--dimensions is for --mode embed only"),
    (["--mode", "rerank", "--encoding-format", "float"], "--encoding-format is for --mode embed only"),
    (["--mode", "rerank", "--top-n", "0"], "--top-n must be >= 1"),
    (["--queries", "q.txt"], "--queries is for --mode rerank only"),
    (["--top-n", "3"], "--top-n is for --mode rerank only"),
    (["--return-documents"], "--return-documents is for --mode rerank only"),
])
def test_bad_arguments_give_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bs.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_machine_info_never_fails():
    info = bs.machine_info()
    assert info["cpu_count"] >= 1 and info["cpu_model"] and info["python"]
    assert isinstance(info["gpus"], list)  # empty, with nvml_error, on machines without NVML


def test_every_flag_has_help():
    for action in bs.build_parser()._actions:
        assert action.help, action.option_strings


# ---------------------------------------------------------------------------
# Fake OpenAI-compatible embeddings server
# ---------------------------------------------------------------------------

def fake_vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def make_app(corrupt_texts=(), fail_texts=(), received=None):
    """Deterministic vectors per text; wrong vectors for corrupt_texts, 500 for requests containing fail_texts.
    Every input received is appended to `received`."""
    received = [] if received is None else received
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.get("/version")
    def version():
        return {"version": "0.0-fake"}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        if body.get("model") != MODEL:
            return JSONResponse({"error": "unknown model"}, status_code=404)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        received.extend(texts)
        # an image item stands for its data URI: vectors and token counts follow that text
        texts = [t if isinstance(t, str) else t["image"] for t in texts]
        if any(t in fail_texts for t in texts):
            return JSONResponse({"error": "boom"}, status_code=500)
        data = []
        for i, text in enumerate(texts):
            vector = -fake_vector(text) if text in corrupt_texts else fake_vector(text)
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            else:
                embedding = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        data.reverse()  # indices, not positions, say which input a vector belongs to
        tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "model": MODEL, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


class ServerThread:
    """uvicorn on an ephemeral loopback port in a background thread."""

    def __init__(self, app):
        import uvicorn
        # Let uvicorn bind port 0 itself: a socket made here with proto=0 would
        # make asyncio skip TCP_NODELAY, and Nagle + delayed ACK adds 40 ms per response.
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            assert self.thread.is_alive(), "fake server failed to start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def dataset(tmp_path):
    texts = bs.synthetic_texts(24, 2, 12, seed=3)
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    reference = np.stack([fake_vector(t) for t in texts])
    np.save(tmp_path / "ref.npy", reference)
    return texts, str(path), str(tmp_path / "ref.npy")


def common_argv(base_url, dataset_path, tmp_path):
    return ["--base-url", base_url, "--dataset", dataset_path, "--num-requests", "12",
            "--warmup-requests", "2", "--no-progress", "--output-json", str(tmp_path / "out.json")]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_end_to_end_sweep_with_check(encoding_format, dataset, tmp_path):
    texts, dataset_path, ref_path = dataset
    with ServerThread(make_app()) as base_url:
        result = bs.main(common_argv(base_url, dataset_path, tmp_path) + [
            "--inputs-per-request", "1,4", "--concurrency", "1,3", "--request-rate", "inf,400",
            "--encoding-format", encoding_format, "--check", ref_path, "--label", "fake",
            "--plot", str(tmp_path / "plot.png")])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["model"] == MODEL  # taken from GET /v1/models
    assert saved["config"]["mode"] == "embed" and {p["mode"] for p in saved["points"]} == {"embed"}
    assert saved["software"]["server"]["/version"] == {"version": "0.0-fake"}
    assert saved["machine"]["cpu_count"] >= 1 and "numpy" in saved["software"]["client"]
    points = saved["points"]
    assert len(points) == 2 * 2 * 2 == len(result["points"])
    assert {p["request_rate"] for p in points} == {"inf", 400.0}
    for p in points:
        assert p["num_requests"] == 12 and p["num_errors"] == 0 and p["errors"] == {}
        assert p["checked_vectors"] == 12 * p["inputs_per_request"]
        assert p["mismatches"] == 0 and p["min_cosine"] > 0.9999
        assert p["requests_per_s"] > 0 and p["tokens_per_s"] > 0
        assert p["inputs_per_s"] == pytest.approx(p["requests_per_s"] * p["inputs_per_request"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_end_to_end_counts_mismatches(dataset, tmp_path):
    texts, dataset_path, ref_path = dataset
    with ServerThread(make_app(corrupt_texts={texts[5], texts[9]})) as base_url:
        result = bs.main(common_argv(base_url, dataset_path, tmp_path) + [
            "--model", MODEL, "--inputs-per-request", "4", "--concurrency", "2", "--check", ref_path])
    (point,) = result["points"]
    # 12 requests x 4 inputs = 48 inputs = each of the 24 texts twice (after 2 warmups, still 2 each).
    assert point["num_errors"] == 0
    assert point["mismatches"] == 4
    assert point["min_cosine"] == pytest.approx(-1.0, abs=1e-5)


def test_end_to_end_counts_errors_by_status(dataset, tmp_path):
    texts, dataset_path, _ = dataset
    with ServerThread(make_app(fail_texts={texts[0], texts[1]})) as base_url:
        result = bs.main(common_argv(base_url, dataset_path, tmp_path) + [
            "--model", MODEL, "--num-requests", "24", "--concurrency", "4"])
    (point,) = result["points"]
    # Requests 2..25 (after 2 warmups) with one text each cover text 0 and 1 once each.
    assert point["errors"] == {"500": 2}
    assert point["num_ok"] == 22 and point["num_requests"] == 24
    assert point["inputs_per_s"] == pytest.approx(point["num_ok"] / point["wall_time_s"])


def test_connection_errors_counted_by_exception_type(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = bs.main(["--base-url", f"http://127.0.0.1:{port}", "--model", MODEL, "--num-texts", "5",
                      "--num-requests", "3", "--warmup-requests", "0", "--no-progress"])
    (point,) = result["points"]
    assert point["errors"] == {"ConnectError": 3} and point["requests_per_s"] == 0


def test_plot_is_skipped_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = bs.main(["--base-url", f"http://127.0.0.1:{port}", "--model", MODEL, "--num-texts", "5",
                      "--num-requests", "1", "--warmup-requests", "0", "--no-progress",
                      "--plot", str(tmp_path / "plot.png")])
    assert len(result["points"]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "plot.png").exists()


def test_duration_mode_stops(dataset, tmp_path):
    _, dataset_path, _ = dataset
    with ServerThread(make_app()) as base_url:
        start = time.monotonic()
        result = bs.main(["--base-url", base_url, "--dataset", dataset_path, "--duration", "0.3",
                          "--concurrency", "2", "--warmup-requests", "0", "--no-progress"])
        assert time.monotonic() - start < 5
    (point,) = result["points"]
    assert point["num_requests"] > 0 and point["num_errors"] == 0
    assert point["wall_time_s"] == pytest.approx(0.3, abs=0.2)


def test_synthetic_images_are_deterministic_jpegs_of_the_asked_size():
    from PIL import Image
    images = bs.synthetic_images(3, 40, 30, seed=1)
    assert images == bs.synthetic_images(3, 40, 30, seed=1) and images != bs.synthetic_images(3, 40, 30, seed=2)
    assert len(set(images)) == 3
    for blob in images:
        with Image.open(io.BytesIO(blob)) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (40, 30), "RGB")


def test_load_images_from_a_directory(tmp_path):
    from PIL import Image
    Image.new("RGB", (4, 3), "red").save(tmp_path / "b.png")
    Image.new("RGB", (5, 2), "blue").save(tmp_path / "a.JPG", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    items = bs.load_images(str(tmp_path))
    assert [item["image"].split(";")[0] for item in items] == ["data:image/jpeg", "data:image/png"]  # by name
    assert base64.b64decode(items[1]["image"].split(",", 1)[1]) == (tmp_path / "b.png").read_bytes()
    assert len(bs.load_images(str(tmp_path), num_images=1)) == 1
    (tmp_path / "a.JPG").unlink()
    (tmp_path / "b.png").unlink()
    with pytest.raises(ValueError, match="no image files"):
        bs.load_images(str(tmp_path))


def test_end_to_end_with_image_items(tmp_path):
    """--images sends items {"image": data URI}, cycling through the images; vectors checked by cosine."""
    from PIL import Image
    received = []
    images = bs.load_images("synthetic:32x24", 5, seed=0)
    np.save(tmp_path / "ref.npy", np.stack([fake_vector(item["image"]) for item in images]))
    with ServerThread(make_app(received=received)) as base_url:
        result = bs.main(["--base-url", base_url, "--images", "synthetic:32x24", "--num-texts", "5",
                          "--inputs-per-request", "2", "--concurrency", "2", "--num-requests", "6",
                          "--warmup-requests", "1", "--no-progress", "--check", str(tmp_path / "ref.npy")])
    (point,) = result["points"]
    assert point["num_errors"] == 0 and point["checked_vectors"] == 12 and point["mismatches"] == 0
    assert result["num_texts"] == 5 and len(received) == 2 * 7
    assert {item["image"] for item in received} == {item["image"] for item in images}
    header, data = received[0]["image"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        assert im.size == (32, 24)


# ---------------------------------------------------------------------------
# --mode rerank against fake rerank servers
# ---------------------------------------------------------------------------

def fake_score(query: str, document: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{query}\0{document}".encode()).digest()[:4], "little") / 2**32


def rerank_tokens(query: str, documents: list[str]) -> int:
    """The fake servers' usage.total_tokens: the words of every (query, document) pair."""
    return sum(len(query.split()) + len(d.split()) for d in documents)


def make_rerank_app(path="/v1/rerank", fault=None, fault_texts=(), usage=True, received=None):
    """The rerank contract: results sorted by relevance_score, cut to top_n, documents when asked, usage.
    A request holding any of fault_texts gets `fault` instead: "unsorted", "missing" (a result short),
    "duplicate" (an index twice), "nan" (a score), "no_results" (no results field), "wrong_document",
    or "error" (500 with an error object). Every request body is appended to `received`."""
    received = [] if received is None else received
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post(path)
    async def rerank(request: Request):
        body = await request.json()
        received.append(body)
        if body.get("model") != MODEL or not isinstance(body.get("query"), str):
            return JSONResponse({"error": {"message": "bad request", "type": "invalid_request_error"}}, 400)
        query, documents = body["query"], body["documents"]
        faulty = fault if any(d in fault_texts for d in documents) else None
        if faulty == "error":
            return JSONResponse({"error": {"message": "boom", "type": "server_error", "code": 500}}, 500)
        items = sorted(({"index": i, "relevance_score": fake_score(query, d)} for i, d in enumerate(documents)),
                       key=lambda item: -item["relevance_score"])
        items = items[:body["top_n"]] if body.get("top_n") else items
        if body.get("return_documents"):
            for item in items:
                item["document"] = {"text": documents[item["index"]]}
        if faulty == "unsorted":
            items.reverse()
        elif faulty == "missing":
            items.pop()
        elif faulty == "duplicate":
            items[1]["index"] = items[0]["index"]
        elif faulty == "nan":
            items[0]["relevance_score"] = math.nan
        elif faulty == "wrong_document":
            items[0]["document"] = {"text": "something else"}
        payload = {"id": "rerank-1", "model": MODEL, "results": items}
        if faulty == "no_results":
            payload = {"id": "rerank-1", "model": MODEL}
        if usage:
            # prompt_tokens differs on purpose: rerank tokens/s must come from total_tokens
            payload["usage"] = {"total_tokens": rerank_tokens(query, documents), "prompt_tokens": 1}
        # json.dumps, not JSONResponse: the latter refuses NaN, which a broken server may well send
        return Response(json.dumps(payload), media_type="application/json")

    return app


def rerank_argv(base_url, dataset_path, *extra):
    return ["--mode", "rerank", "--base-url", base_url, "--dataset", dataset_path, "--no-progress", *extra]


def test_rerank_end_to_end_sweep(dataset, tmp_path):
    texts, dataset_path, _ = dataset
    received = []
    with ServerThread(make_rerank_app(received=received)) as base_url:
        result = bs.main(rerank_argv(base_url, dataset_path, "--inputs-per-request", "1,5", "--concurrency", "1,3",
                                     "--request-rate", "inf,400", "--num-requests", "12", "--warmup-requests", "2",
                                     "--output-json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "p.png")))
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["model"] == MODEL and saved["config"]["mode"] == "rerank"
    assert saved["config"]["rerank_path"] == "/v1/rerank" and saved["config"]["check"] is None
    assert saved["num_texts"] == 24 and saved["num_queries"] == bs.DEFAULT_NUM_SYNTHETIC_QUERIES
    queries = bs.load_queries(None, seed=0)
    assert len(saved["points"]) == 8 == len(result["points"])
    for p in saved["points"]:
        ipr = p["inputs_per_request"]
        assert p["mode"] == "rerank" and p["encoding_format"] is None and p["return_documents"] is False
        assert p["num_requests"] == 12 and p["num_errors"] == 0 and p["errors"] == {}, p
        assert p["inputs_per_s"] == pytest.approx(p["requests_per_s"] * ipr)  # documents/s
        assert p["checked_vectors"] == 0 and p["mismatches"] is None
        # usage.total_tokens of requests 2..13 (after 2 warm-ups), whatever order they ran in
        expected = sum(rerank_tokens(queries[n % len(queries)], [texts[i] for i in bs.request_indices(n, ipr, 24)])
                       for n in range(2, 14))
        assert p["prompt_tokens"] == expected and p["requests_without_usage"] == 0
        assert p["tokens_per_s"] == pytest.approx(expected / p["wall_time_s"])
    assert len(received) == 8 * 14
    for body in received:
        assert set(body) == {"model", "query", "documents", "return_documents"}  # no top_n, no encoding_format
        assert body["return_documents"] is False and body["query"] in queries
        assert len(body["documents"]) in (1, 5) and set(body["documents"]) <= set(texts)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_rerank_path_queries_top_n_and_documents(dataset, tmp_path):
    """A server at /rerank only (vLLM's short route), --queries from a file, top_n and return_documents."""
    texts, dataset_path, _ = dataset
    queries = ["first query", "second query here", "third"]
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n", encoding="utf-8")
    received = []
    with ServerThread(make_rerank_app(path="/rerank", received=received)) as base_url:
        result = bs.main(rerank_argv(base_url, dataset_path, "--rerank-path", "/rerank", "--queries",
                                     str(tmp_path / "q.txt"), "--inputs-per-request", "4", "--top-n", "2",
                                     "--return-documents", "--num-requests", "7", "--warmup-requests", "1",
                                     "--extra-body", '{"truncate_prompt_tokens": 64}'))
        default_path = bs.main(rerank_argv(base_url, dataset_path, "--num-requests", "3", "--warmup-requests", "0"))
    (point,) = result["points"]
    assert point["num_errors"] == 0 and point["top_n"] == 2 and point["return_documents"] is True
    assert point["inputs_per_s"] == pytest.approx(4 * point["requests_per_s"])  # documents sent, not returned
    assert [b["query"] for b in received[:8]] == [queries[n % 3] for n in range(8)]  # concurrency 1: in order
    assert all(b["top_n"] == 2 and b["return_documents"] is True and b["truncate_prompt_tokens"] == 64
               for b in received[:8])
    assert default_path["points"][0]["errors"] == {"404": 3}  # nothing at /v1/rerank there


@pytest.mark.parametrize("fault, error", [
    ("unsorted", "bad_response:order"),
    ("missing", "bad_response:count"),
    ("duplicate", "bad_response:index"),
    ("nan", "bad_response:score"),
    ("no_results", "bad_response:format"),
    ("error", "500"),
])
def test_rerank_malformed_responses_count_as_errors(fault, error, dataset):
    texts, dataset_path, _ = dataset
    # 2 documents a request: warm-up request 0 = texts 0, 1; timed requests 1..12 = texts 2, 3 ... 22, 23, 0, 1.
    # texts[0] is in the warm-up (not counted) and the last timed request; texts[6] in timed request 3.
    with ServerThread(make_rerank_app(fault=fault, fault_texts={texts[0], texts[6]})) as base_url:
        result = bs.main(rerank_argv(base_url, dataset_path, "--inputs-per-request", "2", "--concurrency", "2",
                                     "--num-requests", "12", "--warmup-requests", "1"))
    (point,) = result["points"]
    assert point["errors"] == {error: 2}
    assert point["num_ok"] == 10 and point["num_errors"] == 2
    assert point["inputs_per_s"] == pytest.approx(20 / point["wall_time_s"])  # successful requests only


def test_rerank_wrong_document_is_an_error_only_when_documents_were_asked_for(dataset):
    texts, dataset_path, _ = dataset
    with ServerThread(make_rerank_app(fault="wrong_document", fault_texts={texts[6]})) as base_url:
        argv = rerank_argv(base_url, dataset_path, "--inputs-per-request", "2", "--num-requests", "12",
                           "--warmup-requests", "0")
        asked = bs.main(argv + ["--return-documents"])
        not_asked = bs.main(argv)
    assert asked["points"][0]["errors"] == {"bad_response:document": 1}
    assert not_asked["points"][0]["num_errors"] == 0  # no documents asked: the fault adds a stray one only


def test_rerank_without_usage_reports_tokens_missing(dataset, capsys):
    _, dataset_path, _ = dataset
    with ServerThread(make_rerank_app(usage=False)) as base_url:
        result = bs.main(rerank_argv(base_url, dataset_path, "--inputs-per-request", "3", "--num-requests", "5",
                                     "--warmup-requests", "1"))
    (point,) = result["points"]
    assert point["num_errors"] == 0 and point["num_ok"] == 5
    assert point["tokens_per_s"] is None and point["prompt_tokens"] is None
    assert point["requests_without_usage"] == 5
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[6] == "-"  # the tok/s column
