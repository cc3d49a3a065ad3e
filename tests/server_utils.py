"""Start the real server (launch.py under torchrun, or another launcher) for a test, and clean up after it
whatever happens.

    with ServerProcess(["--model-path", d, "--tp", "2"], nproc=2, log_path=p) as server:
        httpx.post(server.url + "/v1/embeddings", json={"input": "hi"})

The server listens on an ephemeral port (--port 0) and logs the address it got; torchrun runs in a
session of its own so that cleanup can end exactly the processes it started.
"""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.py")


class ServerProcess:
    def __init__(self, args: list[str], nproc: int, log_path: str, api_key: str | None = None,
                 startup_timeout: float = 180.0, launcher: list[str] | None = None, cwd: str = REPO):
        """launcher: the command before the flags (default torchrun with nproc ranks of launch.py)."""
        self.args, self.nproc, self.log_path, self.api_key = args, nproc, str(log_path), api_key
        self.launcher, self.cwd = launcher, cwd
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if self.api_key:
            env["TP_EMBED_API_KEY"] = self.api_key
        launcher = self.launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", str(self.nproc), LAUNCH]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*launcher, "--port", "0", *self.args], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.cwd, env=env,
                                     start_new_session=True)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting:\n{self.log()[-4000:]}")
            if self.url is None:
                m = re.search(r"listening on (http://\S+) \(rank 0", self.log())
                if m:
                    self.url = m.group(1)
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {self.startup_timeout} s:\n{self.log()[-4000:]}")

    def rank_pid(self, rank: int) -> int:
        m = re.search(rf"rank {rank} of \d+: pid (\d+)", self.log())
        assert m, f"no pid logged for rank {rank}:\n{self.log()[-2000:]}"
        return int(m.group(1))

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, json=None, timeout: float = 120.0, **kw) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.post(self.url + path, json=json, headers=headers, timeout=timeout, **kw)

    def get(self, path: str, timeout: float = 30.0, **kw) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.get(self.url + path, headers=headers, timeout=timeout, **kw)

    def metrics(self) -> dict[str, float]:
        """Every sample of one /metrics scrape, keyed 'name' or 'name{labels}'."""
        samples = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def metric(self, name: str, labels: str = "") -> float:
        """One sample, e.g. metric("tp_embed_batch_requests_bucket", 'le="1.0"'); 0 if absent."""
        return self.metrics().get(f"{name}{{{labels}}}" if labels else name, 0.0)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """SIGTERM to rank 0 (the clean path); the whole session gets SIGKILL if that takes over 30 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.rank_pid(0), signal.SIGTERM)
            except (AssertionError, ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:  # stragglers of this session only: torchrun's children share its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def response_vectors(body: dict) -> np.ndarray:
    """float32 [n, d] from an embeddings response, float or base64 encoded, checking index order."""
    import base64
    data = body["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    rows = []
    for d in data:
        assert d["object"] == "embedding"
        e = d["embedding"]
        rows.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str)
                    else np.asarray(e, np.float32))
    return np.stack(rows)
