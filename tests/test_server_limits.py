"""Admission limits of the real server (all-MiniLM-L6-v2, tp=1): request size (413), queued tokens (429 with
Retry-After), request timeout (504), and a client that disconnects while queued."""

import threading
import time

import httpx
import pytest

from server_utils import ServerProcess, response_vectors

MAX_BYTES = 4_000_000
MAX_QUEUED = 530_000
TIMEOUT_S = 5.0
BATCH_TOKENS = 512  # 2 inputs of BIG per batch: the batch running at the timeout ends soon after it
# 2048 inputs x 256 tokens = 1024 batches: far more than 5 s of compute at tp=1 on any CPU
BIG = {"input": [[101] + [1000 + (i * 7 + j) % 29000 for j in range(254)] + [102] for i in range(2048)]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "limits.log"
    args = ["--config", "configs/all-MiniLM-L6-v2.json", "--max-request-bytes", str(MAX_BYTES),
            "--max-queued-tokens", str(MAX_QUEUED), "--request-timeout", str(TIMEOUT_S),
            "--max-batch-tokens", str(BATCH_TOKENS)]
    with ServerProcess(args, nproc=1, log_path=log) as s:
        yield s


def start_big_request(server) -> tuple[threading.Thread, dict]:
    """Send BIG from a thread; return once the server has admitted it."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(response=server.post("/v1/embeddings", BIG)))
    thread.start()
    deadline = time.monotonic() + 30
    while server.metric("tp_embed_queued_tokens") == 0:
        assert time.monotonic() < deadline and thread.is_alive(), "the big request was never admitted"
        time.sleep(0.02)
    return thread, result


def test_body_over_max_request_bytes_is_413(server):
    r = server.post("/v1/embeddings", {"input": "a" * MAX_BYTES})  # with Content-Length
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and str(MAX_BYTES) in r.json()["error"]["message"]
    chunks = (b'{"input": "' + b"a" * 100_000 if i == 0 else b"a" * 100_000 for i in range(MAX_BYTES // 100_000 + 1))
    r = httpx.post(server.url + "/v1/embeddings", content=chunks, timeout=30)  # chunked: counted while read
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert server.post("/v1/embeddings", {"input": "fits"}).status_code == 200


def test_queue_full_is_429_and_a_slow_request_is_504(server):
    batches = server.metric("tp_embed_batch_forward_seconds_count")
    thread, result = start_big_request(server)
    more = {"input": BIG["input"][:64]}  # 16384 tokens: over the budget while BIG is queued
    r = server.post("/v1/embeddings", more)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert str(MAX_QUEUED) in error["message"]
    thread.join(60)
    r = result["response"]
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout" and "5 s" in r.json()["error"]["message"]
    assert server.metric("tp_embed_requests_cancelled_total", 'reason="timeout"') >= 1
    r = server.post("/v1/embeddings", {"input": ["after", "the", "rush"]})
    assert r.status_code == 200 and response_vectors(r.json()).shape == (3, 384)
    # BIG's 1024 batches were not all computed: its remaining inputs left the queue at the timeout
    big_batches = server.metric("tp_embed_batch_forward_seconds_count") - batches - 1  # 1: "after the rush"
    assert big_batches < 1024


def test_disconnected_client_is_dropped_before_compute(server):
    inputs = server.metric("tp_embed_batch_inputs_sum")
    dropped = server.metric("tp_embed_requests_cancelled_total", 'reason="client_disconnected"')
    thread, _ = start_big_request(server)
    with pytest.raises(httpx.ReadTimeout):  # queued behind BIG; the client gives up and closes
        server.post("/v1/embeddings", {"input": ["one", "two", "three"]}, timeout=0.3)
    deadline = time.monotonic() + 5
    while server.metric("tp_embed_requests_cancelled_total", 'reason="client_disconnected"') == dropped:
        assert time.monotonic() < deadline, "the server did not notice the disconnect"
        time.sleep(0.02)
    thread.join(60)
    assert server.post("/v1/embeddings", {"input": "next"}).status_code == 200
    # BIG's batches hold 2 inputs each; the 3 dropped inputs never joined a batch, "next" did
    assert (server.metric("tp_embed_batch_inputs_sum") - inputs - 1) % 2 == 0
