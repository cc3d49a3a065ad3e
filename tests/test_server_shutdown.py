"""How the real server ends at tp=2: SIGTERM drains and every rank exits 0; a dead worker fails what is in
flight with 503 and the job exits non-zero instead of hanging."""

import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from server_utils import ServerProcess, response_vectors
from tiny_models import MIXED_TEXTS


def admitted(server) -> float:
    """Requests admitted so far, from one /metrics scrape so that none is counted twice."""
    m = server.metrics()
    return m["tp_embed_requests_in_flight"] + m["tp_embed_queue_seconds_count"]


def wait_until_admitted(server, count: float) -> None:
    deadline = time.monotonic() + 30
    while admitted(server) < count:
        assert time.monotonic() < deadline, "not all requests were admitted"
        time.sleep(0.01)


def test_sigterm_finishes_in_flight_requests_and_every_rank_exits_0(tmp_path):
    with ServerProcess(["--tp", "2"], nproc=2, log_path=tmp_path / "server.log") as server:
        long_texts = [MIXED_TEXTS[15] + f" {i}" for i in range(32)]  # ~70 tokens each
        results, threads = {}, []
        before = admitted(server)
        for k in range(4):
            def send(k=k):
                results[k] = server.post("/v1/embeddings", {"input": long_texts}, timeout=60)
            threads.append(threading.Thread(target=send))
            threads[-1].start()
        wait_until_admitted(server, before + 4)
        start = time.monotonic()
        # the pid in the log is rank 0's own, so this is exactly "SIGTERM to rank 0"
        os.kill(server.rank_pid(0), signal.SIGTERM)
        time.sleep(0.1)
        late = server.post("/v1/embeddings", {"input": "too late"})
        assert late.status_code == 503, late.text
        assert late.json()["error"]["code"] == "server_not_ready" and "shutting down" in late.json()["error"]["message"]
        health = httpx.get(server.url + "/health")
        assert (health.status_code, health.json()) == (503, {"status": "shutting_down"})
        for t in threads:
            t.join(60)
        assert len(results) == 4
        for r in results.values():
            assert r.status_code == 200, r.text
            vectors = response_vectors(r.json())
            assert vectors.shape == (32, 384)
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert server.wait(30) == 0, server.log()[-3000:]
        assert time.monotonic() - start < 30
        log = server.log()
        assert "Traceback" not in log, log[-3000:]
        assert "SIGTERM: draining" in log


def test_dead_worker_fails_requests_with_503_and_the_job_exits_nonzero(tiny_mistral_dir, tmp_path):
    args = ["--model-path", tiny_mistral_dir, "--tp", "2"]
    with ServerProcess(args, nproc=2, log_path=tmp_path / "server.log") as server:
        result = {}

        def send():
            try:
                result["response"] = server.post("/v1/embeddings", {"input": [MIXED_TEXTS[15]] * 2048}, timeout=60)
            except httpx.TransportError as e:  # rank 0 may already be gone
                result["error"] = e

        thread = threading.Thread(target=send)
        thread.start()
        wait_until_admitted(server, 1)
        os.kill(server.rank_pid(1), signal.SIGKILL)
        thread.join(60)
        if "response" in result:
            r = result["response"]
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "engine_failed"
        start = time.monotonic()
        assert server.wait(30) != 0
        assert time.monotonic() - start < 30
        assert "engine failed" in server.log()


def test_dead_rank0_takes_the_workers_down(tiny_mistral_dir, tmp_path):
    """Rank 0 killed: no worker is left blocked in a broadcast; the whole job exits within 30 s."""
    args = ["--model-path", tiny_mistral_dir, "--tp", "2"]
    with ServerProcess(args, nproc=2, log_path=tmp_path / "server.log") as server:
        worker = server.rank_pid(1)
        os.kill(server.rank_pid(0), signal.SIGKILL)
        start = time.monotonic()
        assert server.wait(30) != 0
        assert time.monotonic() - start < 30
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)  # the worker is gone too
