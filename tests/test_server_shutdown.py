"""How the real server ends at tp=2: SIGTERM drains and every rank exits 0; a dead worker fails what is in
flight with 503 and the job exits non-zero instead of hanging."""

import os
import signal
import threading
import time

import httpx
import numpy as np

from server_utils import ServerProcess, response_vectors
from tiny_models import MIXED_TEXTS


def wait_until_admitted(server, threads) -> None:
    """Until every request of `threads` has been admitted and none has finished."""
    deadline = time.monotonic() + 30
    while server.metric("tp_embed_requests_in_flight") < len(threads):
        assert time.monotonic() < deadline and all(t.is_alive() for t in threads), "not all requests were admitted"
        time.sleep(0.01)


def test_sigterm_finishes_in_flight_requests_and_every_rank_exits_0(tmp_path):
    with ServerProcess(["--tp", "2"], nproc=2, log_path=tmp_path / "server.log") as server:
        long_texts = [MIXED_TEXTS[15] + f" {i}" for i in range(64)]  # ~70 tokens each: ~2 s a batch
        results, threads = {}, []
        for k in range(4):
            def send(k=k):
                results[k] = server.post("/v1/embeddings", {"input": long_texts}, timeout=60)
            threads.append(threading.Thread(target=send))
            threads[-1].start()
        wait_until_admitted(server, threads)
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
            assert vectors.shape == (64, 384)
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert server.wait(30) == 0, server.log()[-3000:]
        assert time.monotonic() - start < 30
        log = server.log()
        assert "Traceback" not in log, log[-3000:]
        assert "signal 15: draining" in log


def test_dead_worker_fails_requests_with_503_and_the_job_exits_nonzero(tiny_mistral_dir, tmp_path):
    args = ["--model-path", tiny_mistral_dir, "--tp", "2"]
    with ServerProcess(args, nproc=2, log_path=tmp_path / "server.log") as server:
        result, threads = {}, []

        def send():
            try:
                result["response"] = server.post("/v1/embeddings", {"input": [MIXED_TEXTS[15]] * 2048}, timeout=60)
            except httpx.TransportError as e:  # rank 0 may already be gone
                result["error"] = e

        threads.append(threading.Thread(target=send))
        threads[0].start()
        wait_until_admitted(server, threads)
        os.kill(server.rank_pid(1), signal.SIGKILL)
        threads[0].join(60)
        if "response" in result:
            r = result["response"]
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "engine_failed"
        start = time.monotonic()
        assert server.wait(30) != 0
        assert time.monotonic() - start < 30
        assert "engine failed" in server.log()
