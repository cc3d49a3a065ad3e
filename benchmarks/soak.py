"""Bounded load-and-soak of a tp-embed server on loopback: many clients for a fixed time, every returned
vector checked against the offline engine, rank 0's memory watched.

    python benchmarks/soak.py --tp 2 --clients 64 --duration 60       # starts a server: all-MiniLM-L6-v2
    python benchmarks/soak.py --model-path DIR --tp 2 --output-json soak.json
    python benchmarks/soak.py --base-url http://127.0.0.1:30000 --server-log server.log   # a running one

1. A fixed pool of --num-texts synthetic texts of --min-words..--max-words words (seeded). Their reference
   vectors come first, from the offline engine at tp=1 (`torchrun ... -m tp_embed.offline`), before any load.
2. Unless --base-url is given, the server starts under torchrun at --tp on an ephemeral loopback port.
3. --clients clients send requests back to back for --duration seconds; each asks for 1..--max-inputs texts
   of the pool, float or base64 at random. Requests still in flight at the end are awaited and counted.
   Inputs longer than the context length are truncated, in the requests and in the reference alike.
4. Every vector of every 200 is compared with its text's reference: cosine below --min-cosine is a mismatch.
5. Rank 0's VmRSS (/proc/PID/status; the pid from the server log's "rank 0 of N: pid P") is sampled every
   --sample-interval seconds; growth is the mean of the last --rss-window seconds over the first's.

Prints a table (and writes --output-json); exits 1 if a request failed, a vector mismatched or RSS grew by
--max-rss-growth or more, 2 if the soak could not run.
"""

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
sys.path[:0] = [BENCHMARKS, os.path.join(REPO, "tests")]
import bench_serving as bs  # noqa: E402  synthetic texts, response decoding, cosines, percentiles
from server_utils import ServerProcess  # noqa: E402  torchrun launch.py on --port 0, clean shutdown


@dataclass(slots=True)
class Record:
    """One request: how long it took and how it ended."""
    latency_s: float
    num_inputs: int
    status: str  # "200", another HTTP status, an exception name, or "bad_response:why"
    mismatches: int = 0
    min_cosine: float | None = None


def read_rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB (what /proc/PID/status reports)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


def rank0_pid(log_text: str) -> int | None:
    """Rank 0's pid from launch.py's "rank 0 of N: pid P" log line."""
    m = re.search(r"rank 0 of \d+: pid (\d+)", log_text)
    return int(m.group(1)) if m else None


def rss_growth(samples: list[tuple[float, int]], duration: float, window: float) -> dict:
    """Mean RSS of the samples taken in [0, window) and in [duration - window, duration], and the relative
    growth last / first - 1 (None when a window holds no sample)."""
    first = [rss for t, rss in samples if t < window]
    last = [rss for t, rss in samples if duration - window <= t <= duration]
    first_mean = float(np.mean(first)) if first else None
    last_mean = float(np.mean(last)) if last else None
    growth = last_mean / first_mean - 1 if first_mean and last_mean is not None else None
    return {"rss_first_window_kb": first_mean, "rss_last_window_kb": last_mean, "rss_growth": growth}


def summarise(records: list[Record], wall_s: float) -> dict:
    """Counts and latency percentiles (over the successful requests) of a soak."""
    ok = [r for r in records if r.status == "200"]
    latency_ms = bs.percentiles([r.latency_s * 1000 for r in ok], (50, 99))
    cosines = [r.min_cosine for r in ok if r.min_cosine is not None]
    return {"requests": len(records), "ok": len(ok),
            "errors": dict(sorted(Counter(r.status for r in records if r.status != "200").items())),
            "vectors_checked": sum(r.num_inputs for r in ok), "mismatches": sum(r.mismatches for r in ok),
            "min_cosine": min(cosines) if cosines else None,
            "latency_p50_ms": latency_ms[50], "latency_p99_ms": latency_ms[99],
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
            "inputs_per_s": sum(r.num_inputs for r in ok) / wall_s if wall_s > 0 else None}


def failures(result: dict, max_rss_growth: float) -> list[str]:
    """Why the soak failed; empty when it passed."""
    reasons = []
    if result["ok"] == 0:
        reasons.append("no request succeeded")
    if result["errors"]:
        reasons.append(f"{sum(result['errors'].values())} requests failed: {result['errors']}")
    if result["mismatches"]:
        reasons.append(f"{result['mismatches']} vectors differ from the offline reference")
    growth = result.get("rss_growth")
    if growth is not None and growth >= max_rss_growth:
        reasons.append(f"rank 0's RSS grew by {growth:.1%} (limit {max_rss_growth:.0%})")
    return reasons


def reference_vectors(texts: list[str], model_path: str | None, work_dir: str) -> np.ndarray:
    """The offline engine (tp=1, under torchrun) on the pool: row i is the vector of texts[i]."""
    texts_path, ref_path = os.path.join(work_dir, "texts.txt"), os.path.join(work_dir, "ref.npy")
    with open(texts_path, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in texts))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "tp_embed.offline", "--input", texts_path, "--output", ref_path, "--allow-auto-truncate"]
    if model_path:
        cmd += ["--model-path", model_path]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the offline reference failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    reference = np.load(ref_path)
    assert reference.shape[0] == len(texts), (reference.shape, len(texts))
    return reference


async def client_loop(client: httpx.AsyncClient, rng: random.Random, texts: list[str], reference: np.ndarray,
                      deadline: float, max_inputs: int, min_cosine: float, records: list[Record]) -> None:
    while time.monotonic() < deadline:
        indices = rng.sample(range(len(texts)), rng.randint(1, max_inputs))
        body = {"input": [texts[i] for i in indices], "encoding_format": rng.choice(("float", "base64")),
                "truncate": True}
        start = time.monotonic()
        try:
            response = await client.post("/v1/embeddings", json=body)
        except httpx.HTTPError as e:
            records.append(Record(time.monotonic() - start, len(indices), type(e).__name__))
            continue
        latency = time.monotonic() - start
        if response.status_code != 200:
            records.append(Record(latency, len(indices), str(response.status_code)))
            continue
        try:
            vectors = bs.decode_response(response.json(), len(indices))
        except (bs.BadResponse, ValueError) as e:
            why = str(e) if isinstance(e, bs.BadResponse) else "json"
            records.append(Record(latency, len(indices), f"bad_response:{why}"))
            continue
        if vectors.shape[1] != reference.shape[1]:
            records.append(Record(latency, len(indices), "bad_response:dimension"))
            continue
        cosines = bs.cosine_similarities(vectors, reference[indices])
        records.append(Record(latency, len(indices), "200", int((cosines < min_cosine).sum()),
                              float(cosines.min())))


async def sample_rss(pid: int, t0: float, interval: float, samples: list[tuple[float, int]],
                     stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - t0, read_rss_kb(pid)))
        except OSError:  # rank 0 is gone; the failed requests say so
            return
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def soak(args, base_url: str, pid: int | None, texts: list[str], reference: np.ndarray) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    samples: list[tuple[float, int]] = []
    records: list[Record] = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=args.request_timeout) as client:
        rss_start = read_rss_kb(pid) if pid else None
        t0 = time.monotonic()
        deadline = t0 + args.duration
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_rss(pid, t0, args.sample_interval, samples, stop)) if pid else None
        clients = [client_loop(client, random.Random(args.seed * 100003 + c), texts, reference, deadline,
                               args.max_inputs, args.min_cosine, records) for c in range(args.clients)]
        if sampler is not None:
            # the windows cover the load, not the wait for the last requests in flight
            asyncio.get_running_loop().call_later(args.duration, stop.set)
        await asyncio.gather(*clients)
        wall_s = time.monotonic() - t0
        stop.set()
        if sampler is not None:
            await sampler
        try:
            rss_end = read_rss_kb(pid) if pid else None
        except OSError:
            rss_end = None
    result = summarise(records, wall_s)
    result.update(wall_s=wall_s, rss_start_kb=rss_start, rss_end_kb=rss_end,
                  **rss_growth(samples, args.duration, args.rss_window), rss_samples=samples)
    return result


def format_table(result: dict) -> str:
    def kib(value):
        return "not measured" if value is None else f"{value / 1024:.1f} MiB"

    growth = result["rss_growth"]
    rows = [("requests", result["requests"]), ("ok", result["ok"]),
            ("errors by status", ", ".join(f"{k}: {v}" for k, v in result["errors"].items()) or "none"),
            ("vectors checked", result["vectors_checked"]), ("mismatches", result["mismatches"]),
            ("min cosine", "-" if result["min_cosine"] is None else f"{result['min_cosine']:.7f}"),
            ("requests/s", f"{result['requests_per_s']:.2f}"), ("inputs/s", f"{result['inputs_per_s']:.1f}"),
            ("latency p50", "-" if result["latency_p50_ms"] is None else f"{result['latency_p50_ms']:.0f} ms"),
            ("latency p99", "-" if result["latency_p99_ms"] is None else f"{result['latency_p99_ms']:.0f} ms"),
            ("wall time", f"{result['wall_s']:.1f} s"),
            ("rank 0 RSS start", kib(result["rss_start_kb"])), ("rank 0 RSS end", kib(result["rss_end_kb"])),
            ("RSS first window", kib(result["rss_first_window_kb"])),
            ("RSS last window", kib(result["rss_last_window_kb"])),
            ("RSS growth", "not measured" if growth is None else f"{growth:+.2%}"),
            ("load average", f"{result['load_average_start']} -> {result['load_average_end']}"),
            ("result", "PASS" if not result["failures"] else "FAIL: " + "; ".join(result["failures"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=None,
                   help="soak a running server at this URL instead of starting one (loopback: the RSS is read "
                        "from this machine's /proc)")
    g.add_argument("--server-log", default=None, metavar="FILE",
                   help="the server's log: where the started server writes it (default: in the work directory), "
                        "or, with --base-url, the running server's log, read for rank 0's pid (without it "
                        "RSS is not measured)")
    g.add_argument("--model-path", default=None, metavar="DIR",
                   help="model directory for the server and the reference (default: the embedded "
                        "all-MiniLM-L6-v2); with --base-url, the model the running server serves")
    g.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the started server (default 2)")
    g.add_argument("--api-key", default=os.environ.get("TP_EMBED_API_KEY"),
                   help="Bearer key to send (default: $TP_EMBED_API_KEY; a started server requires it too)")
    g = p.add_argument_group("load")
    g.add_argument("--clients", type=int, default=64, help="concurrent clients, each one request at a time "
                   "(default 64)")
    g.add_argument("--duration", type=float, default=60.0, metavar="SECONDS",
                   help="how long the clients send new requests (default 60)")
    g.add_argument("--num-texts", type=int, default=256, help="size of the text pool (default 256)")
    g.add_argument("--min-words", type=int, default=1, help="fewest words of a text (default 1)")
    g.add_argument("--max-words", type=int, default=200, help="most words of a text (default 200)")
    g.add_argument("--max-inputs", type=int, default=32, help="most texts in one request (default 32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the text pool and the clients' choices (default 0)")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="client timeout of one request (default 600)")
    g = p.add_argument_group("checks")
    g.add_argument("--min-cosine", type=float, default=0.99999,
                   help="a vector whose cosine with its reference is lower is a mismatch (default 0.99999)")
    g.add_argument("--sample-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often rank 0's RSS is read (default 1)")
    g.add_argument("--rss-window", type=float, default=10.0, metavar="SECONDS",
                   help="RSS growth compares the mean of the first and the last this many seconds (default 10)")
    g.add_argument("--max-rss-growth", type=float, default=0.10,
                   help="fail when RSS grows by this fraction or more (default 0.10)")
    g.add_argument("--work-dir", default=None,
                   help="where the text pool, the reference vectors and the server log go (default: a new "
                        "temporary directory)")
    g.add_argument("--output-json", default=None, metavar="FILE", help="also write the result as JSON here")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("tp", "clients", "num_texts", "min_words", "max_inputs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_words < args.min_words:
        p.error(f"--max-words {args.max_words} is below --min-words {args.min_words}")
    if args.max_inputs > args.num_texts:
        p.error(f"--max-inputs {args.max_inputs} is more than the {args.num_texts} texts of the pool")
    if not 0 < args.rss_window <= args.duration / 2:
        p.error(f"--rss-window {args.rss_window:g} must be positive and at most half of --duration "
                f"{args.duration:g}, so that the first and last windows do not overlap")
    if args.sample_interval <= 0 or args.request_timeout <= 0:
        p.error("--sample-interval and --request-timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="tp-embed-soak-")
    os.makedirs(work_dir, exist_ok=True)
    texts = bs.synthetic_texts(args.num_texts, args.min_words, args.max_words, seed=args.seed)
    print(f"soak: references for {len(texts)} texts from the offline engine (work dir {work_dir})", file=sys.stderr)
    try:
        reference = reference_vectors(texts, args.model_path, work_dir)
    except RuntimeError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    server = None
    log_path = args.server_log or os.path.join(work_dir, "server.log")
    if args.base_url:
        base_url = args.base_url.rstrip("/")
        pid = None
        if args.server_log:
            with open(args.server_log, encoding="utf-8", errors="replace") as f:
                pid = rank0_pid(f.read())
    else:
        server_args = ["--tp", str(args.tp)] + (["--model-path", args.model_path] if args.model_path else [])
        server = ServerProcess(server_args, nproc=args.tp, log_path=log_path, api_key=args.api_key,
                               startup_timeout=600)
        print(f"soak: starting the server at tp={args.tp} (log {log_path})", file=sys.stderr)
        try:
            server.__enter__()
        except (RuntimeError, TimeoutError) as e:
            print(f"soak: {e}", file=sys.stderr)
            return 2
        base_url, pid = server.url, server.rank_pid(0)
    print(f"soak: {args.clients} clients for {args.duration:g} s against {base_url}"
          + (f", rank 0 pid {pid}" if pid else ", RSS not measured (no --server-log)"), file=sys.stderr)
    load_start = os.getloadavg()
    try:
        result = asyncio.run(soak(args, base_url, pid, texts, reference))
    finally:
        if server is not None:
            server.close()
    result.update(load_average_start=[round(x, 2) for x in load_start],
                  load_average_end=[round(x, 2) for x in os.getloadavg()], cpu_count=os.cpu_count(),
                  server_exit_code=server.proc.returncode if server is not None else None)
    result["failures"] = failures(result, args.max_rss_growth)
    if server is not None and server.proc.returncode != 0:
        result["failures"].append(f"the server exited with {server.proc.returncode} (log {log_path})")
    print(format_table(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), **bs.json_safe(result)}, f, indent=1)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
