"""Load generator for any OpenAI-compatible ``POST /v1/embeddings`` server, or
any server with a ``POST /v1/rerank`` route (``--mode rerank``).

Works against tp-embed and against peers (vLLM, Infinity, TEI): it only speaks
the OpenAI embeddings wire format, or the rerank format that tp-embed, vLLM,
Jina and Infinity share. For every point of a sweep over
inputs-per-request x concurrency x request-rate it reports requests/s,
inputs/s, tokens/s (from ``usage.prompt_tokens``), latency percentiles, errors
by HTTP status / exception type and, with ``--check``, vectors whose cosine
similarity to a reference falls below a threshold.

Rerank mode (``--mode rerank``): each request is one query and N documents,
N from ``--inputs-per-request``:
``{"model", "query", "documents": [...], "return_documents": false, "top_n"?}``
sent to ``--rerank-path`` (default /v1/rerank; vLLM also serves /rerank,
Cohere's API is /v2/rerank). Queries are short synthetic texts (or
``--queries FILE``), request n taking query n modulo their number; documents
come from the same pool as embed mode's texts (``--dataset`` or synthetic).
inputs/s counts documents, tokens/s comes from ``usage.total_tokens`` (or
``usage.prompt_tokens`` when only that is given; still stored in the
``prompt_tokens`` field of a point). A response counts as an error
("bad_response:REASON") unless ``results`` has N entries (or top_n), every
``index`` is in range and unique, every ``relevance_score`` is finite and the
scores come sorted highest first (and, with ``--return-documents``, each
result's document is the one sent). ``--check``, ``--images``,
``--encoding-format`` and ``--dimensions`` are embed-only.

Usage examples::

    # Closed loop: 1 and 8 concurrent workers, 1 and 32 texts per request,
    # 500 synthetic texts of 16..256 words, 200 timed requests per point.
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 \\
        --inputs-per-request 1,32 --concurrency 1,8 --num-requests 200 \\
        --synthetic-min-words 16 --synthetic-max-words 256 --num-texts 500 \\
        --output-json results/tp.json --plot results/tp.png --label tp-embed

    # Open loop: Poisson arrivals at 50 and 100 requests/s for 30 s each,
    # at most 64 requests in flight, base64 responses, against vLLM.
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8001 \\
        --model BAAI/bge-m3 --request-rate 50,100 --concurrency 64 \\
        --duration 30 --encoding-format base64 \\
        --extra-body '{"truncate_prompt_tokens": 256}' --label vllm

    # Correctness: compare every returned vector with reference vectors
    # (row i of REF.npy is the embedding of line i of texts.txt).
    python benchmarks/bench_serving.py --dataset texts.txt --check ref.npy

    # Images (CLIP, GME on tp-embed): each input an item {"image": data URI},
    # from the files of a directory or synthetic 640x480 JPEGs.
    python benchmarks/bench_serving.py --images photos/ --concurrency 1,8
    python benchmarks/bench_serving.py --images synthetic:640x480 --num-texts 64

    # Rerank: one query and 10 or 100 documents per request at 1 and 8
    # concurrent workers, against vLLM's /rerank (or tp-embed's /v1/rerank).
    python benchmarks/bench_serving.py --mode rerank --base-url http://127.0.0.1:8001 \\
        --rerank-path /rerank --inputs-per-request 10,100 --concurrency 1,8 \\
        --queries queries.txt --dataset passages.txt --output-json results/rerank.json

The machine description in the JSON result is that of the machine running this
script; run it on the server machine (loopback) when the two must match.

Other scripts can ``import bench_serving`` and call ``main([...])`` (returns the
result dict) or ``await run_point(client, texts, ...)`` directly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx
import numpy as np
from tqdm import tqdm

EMBEDDINGS_PATH = "/v1/embeddings"
RERANK_PATH = "/v1/rerank"
MODES = ("embed", "rerank")
DEFAULT_NUM_REQUESTS = 200
DEFAULT_NUM_SYNTHETIC_QUERIES = 100
SYNTHETIC_QUERY_WORDS = (3, 12)  # rerank queries: shorter than the documents, as search queries are
DEFAULT_NUM_SYNTHETIC_TEXTS = 1000
DEFAULT_NUM_SYNTHETIC_IMAGES = 64
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp"}


# ---------------------------------------------------------------------------
# Inputs: texts and reference vectors
# ---------------------------------------------------------------------------

_COMMON_WORDS = """
the of and to a in is that for it as was with be by on not he this are or his from at which but have
an they you were her she there had been one all we can their has more its would also will other two
if into who so than them some time only these may first then do any like my now over such our man me
even most made after did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long
get here between both life being under never day same another know while last might us great old
year off come since against go came right used take three states himself few house use during
without again place around however home small found thought went say part once general high upon
school every does got united left number course war until always away something fact though water
less public put think almost hand enough far took head yet government system better set told nothing
night end why called eyes find going look asked later point knew city next program business give
group toward young days let room president side social given present several order national possible
rather second face per among form important often things looked early white john case become large
big need four within felt along children saw best church ever least power development light thing
seemed family interest want members mind country area others done turned although open god service
problem certain kind different thus began door help sense means whole matter perhaps itself york
times law human line above name example action company hands local show whether five history gave
today either act feet across taken past quite anything seen having death week experience body word
half really field am car words already themselves information tell together college shall money
period held keep sure free probably seems political real behind cannot miss question air office
making brought whose special heard major problems ago became federal moment study available known
result street economic boy position reason change south board individual job society areas west
close turn love community true court force full seem wife future age wanted department voice center
woman control common policy necessary following front sometimes six girl clear further land run
students provide feel party able mother music education university child effect level stood military
town short morning total outside rate figure class art century washington north usually plan leave
therefore evidence top million sound black strong hard various says believe type value play surface
soon mean near lines table peace modern tax road red book personal process situation minutes
increase idea english alone women gone nature cost porch report pressure except private data meeting
""".split()


def synthetic_texts(num_texts: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    """Deterministic English-like prose, word count uniform in [min_words, max_words].

    Words are drawn from ~480 common English words with Zipf weights (the k-th most common word about
    1/k as often as the first), in sentences of 6 to 24 words with capitals, full stops and the odd
    comma. all-MiniLM-L6-v2's WordPiece tokenizer makes about 1.15 tokens a word of it (real English
    prose, with its rarer words: about 1.3), so 5 to 200 words come to about 115 tokens on average.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(_COMMON_WORDS))]

    def text(num_words: int) -> str:
        words = rng.choices(_COMMON_WORDS, weights, k=num_words)
        out, sentence_left = [], 0
        for i, w in enumerate(words):
            if sentence_left == 0:
                w = w.capitalize()
                sentence_left = rng.randint(6, 24)
            sentence_left -= 1
            if sentence_left == 0 or i == num_words - 1:
                w += "."
            elif rng.random() < 0.08:
                w += ","
            out.append(w)
        return " ".join(out)

    return [text(rng.randint(min_words, max_words)) for _ in range(num_texts)]


def load_dataset(path: str) -> list[str]:
    """Texts from a file: one per line, or the "text" field of each line of a .jsonl.

    Blank lines are skipped, so a reference file's row i is the i-th non-blank line.
    """
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            texts.append(json.loads(line)["text"] if path.endswith(".jsonl") else line)
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def load_queries(path: str | None, seed: int = 0) -> list[str]:
    """Rerank queries: the texts of a file (as load_dataset reads it), or DEFAULT_NUM_SYNTHETIC_QUERIES
    synthetic ones of 3 to 12 words, drawn with another seed than the documents (seed + 1)."""
    if path:
        return load_dataset(path)
    return synthetic_texts(DEFAULT_NUM_SYNTHETIC_QUERIES, *SYNTHETIC_QUERY_WORDS, seed=seed + 1)


def parse_image_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise ValueError(f"image size must be WIDTHxHEIGHT in pixels, e.g. 640x480, got {text!r}")
    return int(width), int(height)


def synthetic_images(num_images: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Deterministic JPEGs (quality 90) of colour gradients with noise: they compress and decode like
    photographs, not like flat colour (tiny files) or pure noise (huge ones)."""
    from PIL import Image  # lazy: text benchmarks need no pillow

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(num_images):
        fx, fy, phase = rng.uniform(0.2, 2.0, 3), rng.uniform(0.2, 2.0, 3), rng.uniform(0, 256, 3)
        pixels = np.stack([x * fx[c] + y * fy[c] + phase[c] for c in range(3)], axis=-1) % 256
        pixels += rng.integers(0, 24, pixels.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def image_files(directory: str) -> list[str]:
    """The names of a directory's image files (.png .jpg .jpeg .webp .gif .bmp), sorted; ValueError if
    it is not a directory or holds none."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory (or 'synthetic:WxH')")
    names = sorted(n for n in os.listdir(directory) if os.path.splitext(n)[1].lower() in IMAGE_TYPES)
    if not names:
        raise ValueError(f"{directory}: no image files ({' '.join(IMAGE_TYPES)})")
    return names


def synthetic_size(source: str) -> tuple[int, int] | None:
    """(width, height) of an --images source "synthetic" (640x480) or "synthetic:WxH"; None for a directory."""
    if source != "synthetic" and not source.startswith("synthetic:"):
        return None
    return parse_image_size(source.partition(":")[2] or "640x480")


def check_image_source(source: str) -> None:
    """ValueError unless --images names a usable source: synthetic[:WxH], or a directory with images."""
    if synthetic_size(source) is None:
        image_files(source)


def load_images(source: str, num_images: int | None = None, seed: int = 0) -> list[dict]:
    """Inputs {"image": "data:<type>;base64,..."} (tp-embed's items, for CLIP and GME): `source` is a
    directory (its image files by name: .png .jpg .jpeg .webp .gif .bmp, the first num_images) or
    "synthetic" / "synthetic:WxH" (num_images JPEGs, default 64 of 640x480)."""
    size = synthetic_size(source)
    if size is not None:
        blobs = [("image/jpeg", b) for b in synthetic_images(num_images or DEFAULT_NUM_SYNTHETIC_IMAGES, *size, seed)]
    else:
        blobs = []
        for name in image_files(source)[:num_images]:
            with open(os.path.join(source, name), "rb") as f:
                blobs.append((IMAGE_TYPES[os.path.splitext(name)[1].lower()], f.read()))
    return [{"image": f"data:{mime};base64,{base64.b64encode(blob).decode()}"} for mime, blob in blobs]


# ---------------------------------------------------------------------------
# Pure result arithmetic
# ---------------------------------------------------------------------------

class BadResponse(Exception):
    """A 200 response whose body does not match the request; str(self) is a short reason."""


def decode_embedding(embedding) -> np.ndarray:
    """One OpenAI `embedding` field -> float32 vector.

    A string is base64 of little-endian float32 (encoding_format=base64), a list
    is floats. Decided by type, not by what was asked, so a server that ignores
    encoding_format still decodes correctly.
    """
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding, validate=True)
        if len(raw) % 4:
            raise ValueError(f"base64 embedding of {len(raw)} bytes is not float32")
        return np.frombuffer(raw, dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def decode_response(payload: dict, num_inputs: int) -> np.ndarray:
    """OpenAI embeddings response -> (num_inputs, dim) array, row i = input i.

    Rows are placed by their `index` field (the contract), so the check is that
    the indices are exactly 0..num_inputs-1, in whatever order they arrive.
    """
    try:
        data = payload["data"]
        indices = [item["index"] for item in data]
        embeddings = [item["embedding"] for item in data]
    except (KeyError, TypeError) as exc:
        raise BadResponse("format") from exc
    if len(data) != num_inputs:
        raise BadResponse("count")
    if sorted(indices) != list(range(num_inputs)):
        raise BadResponse("index")
    try:
        vectors = [decode_embedding(e) for e in embeddings]
    except (ValueError, TypeError) as exc:
        raise BadResponse("decode") from exc
    if len({v.shape for v in vectors}) != 1 or vectors[0].ndim != 1:
        raise BadResponse("dimension")
    ordered = np.empty((num_inputs, vectors[0].shape[0]), dtype=np.float32)
    for index, vector in zip(indices, vectors):
        ordered[index] = vector
    return ordered


def expected_rerank_results(num_documents: int, top_n=None) -> int:
    """How many results a rerank response must hold: all documents, or top_n of them when top_n is a
    positive integer (vLLM reads top_n <= 0 as all)."""
    if isinstance(top_n, int) and not isinstance(top_n, bool) and top_n > 0:
        return min(top_n, num_documents)
    return num_documents


def decode_rerank_response(payload: dict, documents: list[str], top_n=None,
                           return_documents: bool = False) -> list[tuple[int, float]]:
    """Rerank response -> [(document index, relevance score)], as the server ordered them.

    BadResponse unless `results` holds one entry per document (top_n of them when asked), every index
    is an integer in range and unique, every score is a finite number, the scores are sorted highest
    first, and (with return_documents) each result's document, {"text": ...} or a bare string, is the
    document sent at its index.
    """
    try:
        results = payload["results"]
        if not isinstance(results, list):
            raise TypeError("results is not a list")
        pairs = [(item["index"], item["relevance_score"]) for item in results]
    except (KeyError, TypeError) as exc:
        raise BadResponse("format") from exc
    if len(pairs) != expected_rerank_results(len(documents), top_n):
        raise BadResponse("count")
    indices = [index for index, _ in pairs]
    if (not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(documents) for i in indices)
            or len(set(indices)) != len(indices)):
        raise BadResponse("index")
    scores = [score for _, score in pairs]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores):
        raise BadResponse("score")
    if any(a < b for a, b in zip(scores, scores[1:])):
        raise BadResponse("order")
    if return_documents:
        for item in results:
            document = item.get("document")
            text = document.get("text") if isinstance(document, dict) else document
            if text != documents[item["index"]]:
                raise BadResponse("document")
    return [(int(i), float(v)) for i, v in pairs]


def cosine_similarities(vectors: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; a zero vector scores 0 (and so counts as a mismatch)."""
    vectors = vectors.astype(np.float64)
    references = references.astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(references, axis=1)
    dots = np.einsum("ij,ij->i", vectors, references)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def percentiles(values, qs=(50, 90, 99)) -> dict[int, float | None]:
    """Linear-interpolated percentiles (numpy's default); None for no data."""
    if len(values) == 0:
        return {q: None for q in qs}
    return {q: float(v) for q, v in zip(qs, np.percentile(np.asarray(values, dtype=np.float64), qs))}


@dataclass
class RequestRecord:
    """Outcome of one timed request."""
    start_s: float                  # send time, seconds since the point started
    latency_s: float                # send -> full response body received
    num_inputs: int
    error: str | None = None        # None = ok; else HTTP status, exception type or "bad_response:why"
    prompt_tokens: int | None = None  # usage.prompt_tokens (rerank: total_tokens), when the server reports it
    checked: int = 0                # vectors compared with the reference
    mismatches: int = 0             # of those, how many fell below the threshold
    min_cosine: float | None = None


def summarise(records: list[RequestRecord], wall_time: float) -> dict:
    """Per-point metrics from per-request records and the point's wall time (s).

    Throughput counts successful requests only; latency is over successful
    requests only (an instant 500 should not make a server look fast).
    """
    ok = [r for r in records if r.error is None]
    latencies_ms = [r.latency_s * 1000.0 for r in ok]
    latency = percentiles(latencies_ms, (50, 90, 99))
    usage = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    checked = sum(r.checked for r in records)
    cosines = [r.min_cosine for r in records if r.min_cosine is not None]
    per_second = (lambda n: n / wall_time) if wall_time > 0 else (lambda n: None)
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_errors": len(records) - len(ok),
        "errors": dict(sorted(Counter(r.error for r in records if r.error is not None).items())),
        "wall_time_s": wall_time,
        "requests_per_s": per_second(len(ok)),
        "inputs_per_s": per_second(sum(r.num_inputs for r in ok)),
        # None rather than 0 when the server reports no usage: unknown is not zero.
        "tokens_per_s": per_second(sum(usage)) if usage else None,
        "prompt_tokens": sum(usage) if usage else None,
        "requests_without_usage": len(ok) - len(usage),
        "latency_p50_ms": latency[50],
        "latency_p90_ms": latency[90],
        "latency_p99_ms": latency[99],
        "latency_mean_ms": float(np.mean(latencies_ms)) if latencies_ms else None,
        "checked_vectors": checked,
        "mismatches": sum(r.mismatches for r in records) if checked else None,
        "min_cosine": min(cosines) if cosines else None,
    }


# ---------------------------------------------------------------------------
# Load generation
# ---------------------------------------------------------------------------

def usage_tokens(payload: dict, mode: str = "embed") -> int | None:
    """Tokens a response's `usage` reports: prompt_tokens, or for a rerank total_tokens (else
    prompt_tokens); None when the server reports neither."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    keys = ("total_tokens", "prompt_tokens") if mode == "rerank" else ("prompt_tokens",)
    for key in keys:
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def request_indices(request_number: int, inputs_per_request: int, num_texts: int) -> list[int]:
    """Text indices for the n-th request: consecutive texts, wrapping around the dataset."""
    first = request_number * inputs_per_request
    return [(first + j) % num_texts for j in range(inputs_per_request)]


async def post_for_json(client: httpx.AsyncClient, path: str, body: dict, record: RequestRecord,
                        sent: float) -> dict | None:
    """POST `body` to `path` and return the response's JSON; on a transport error, a status other than 200 or
    a body that is not JSON, set record.error and return None. Sets record.latency_s either way."""
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        record.latency_s = time.perf_counter() - sent
        record.error = type(exc).__name__
        return None
    record.latency_s = time.perf_counter() - sent
    if response.status_code != 200:
        record.error = str(response.status_code)
        return None
    try:
        return response.json()
    except ValueError:
        record.error = "bad_response:json"
        return None


async def send_request(client: httpx.AsyncClient, body: dict, indices: list[int],
                       point_start: float, reference: np.ndarray | None = None,
                       check_threshold: float = 0.9999, *, mode: str = "embed",
                       path: str | None = None) -> RequestRecord:
    """POST one embeddings request (mode "rerank": one rerank request, to `path`, default RERANK_PATH)
    and turn the outcome into a RequestRecord."""
    if mode == "rerank":
        return await send_rerank_request(client, body, point_start, path or RERANK_PATH)
    sent = time.perf_counter()
    record = RequestRecord(start_s=sent - point_start, latency_s=0.0, num_inputs=len(indices))
    payload = await post_for_json(client, path or EMBEDDINGS_PATH, body, record, sent)
    if payload is None:
        return record
    try:
        vectors = decode_response(payload, len(indices))
    except BadResponse as exc:
        record.error = f"bad_response:{exc}"
        return record
    record.prompt_tokens = usage_tokens(payload)
    if reference is not None:
        expected = reference[indices]
        # A shorter vector is what --dimensions (Matryoshka truncation) returns:
        # compare with the reference's leading components, cosine ignores the norm.
        if vectors.shape[1] > expected.shape[1]:
            record.error = "bad_response:dimension"
            return record
        cosines = cosine_similarities(vectors, expected[:, :vectors.shape[1]])
        record.checked = len(cosines)
        record.mismatches = int(np.sum(cosines < check_threshold))
        record.min_cosine = float(cosines.min())
    return record


async def send_rerank_request(client: httpx.AsyncClient, body: dict, point_start: float,
                              path: str = RERANK_PATH) -> RequestRecord:
    """POST one rerank request and turn the outcome into a RequestRecord; its inputs are the documents."""
    sent = time.perf_counter()
    record = RequestRecord(start_s=sent - point_start, latency_s=0.0, num_inputs=len(body["documents"]))
    payload = await post_for_json(client, path, body, record, sent)
    if payload is None:
        return record
    try:
        decode_rerank_response(payload, body["documents"], body.get("top_n"), bool(body.get("return_documents")))
    except BadResponse as exc:
        record.error = f"bad_response:{exc}"
        return record
    record.prompt_tokens = usage_tokens(payload, "rerank")
    return record


async def run_point(client: httpx.AsyncClient, texts: list[str], *, model: str,
                    inputs_per_request: int, concurrency: int, request_rate: float = math.inf,
                    num_requests: int | None = None, duration: float | None = None,
                    warmup_requests: int = 0, encoding_format: str = "float",
                    dimensions: int | None = None, extra_body: dict | None = None,
                    reference: np.ndarray | None = None, check_threshold: float = 0.9999,
                    seed: int = 0, show_progress: bool = True, mode: str = "embed",
                    queries: list[str] | None = None, rerank_path: str = RERANK_PATH,
                    top_n: int | None = None, return_documents: bool = False) -> dict:
    """Run one sweep point and return its configuration merged with summarise().

    mode="embed": each request embeds `inputs_per_request` texts. mode="rerank": each request
    reranks `inputs_per_request` documents drawn from `texts` for one of `queries` (request n takes
    query n modulo their number), POSTed to `rerank_path`; encoding_format, dimensions and reference
    do not apply.

    request_rate=inf: closed loop, `concurrency` workers each sending back to
    back. Finite rate: Poisson arrivals at that many requests/s, with at most
    `concurrency` in flight (later arrivals wait; latency is timed from send).
    Stops after `num_requests` requests or after `duration` seconds of sending
    (in-flight requests are then awaited), whichever is given.
    `client` must have base_url set and a pool of at least `concurrency`.
    """
    if (num_requests is None) == (duration is None):
        raise ValueError("give exactly one of num_requests and duration")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "rerank":
        if not queries:
            raise ValueError("rerank mode needs at least one query")
        if reference is not None:
            raise ValueError("reference vectors are for embed mode only")
        encoding_format, dimensions = None, None
    if reference is not None and len(reference) < len(texts):
        raise ValueError(f"reference has {len(reference)} rows for {len(texts)} texts")

    def request(n: int) -> tuple[dict, list[int]]:
        """The body of the n-th request and the indices of the texts it carries."""
        indices = request_indices(n, inputs_per_request, len(texts))
        if mode == "rerank":
            body = {"model": model, "query": queries[n % len(queries)],
                    "documents": [texts[i] for i in indices], "return_documents": return_documents}
            if top_n is not None:
                body["top_n"] = top_n
        else:
            body = {"model": model, "input": [texts[i] for i in indices],
                    "encoding_format": encoding_format}
            if dimensions is not None:
                body["dimensions"] = dimensions
        body.update(extra_body or {})
        return body, indices

    path = rerank_path if mode == "rerank" else EMBEDDINGS_PATH

    # Warmup continues through the dataset so timed requests do not start with
    # texts the server has just seen; its outcomes are not recorded.
    warmup_counter = itertools.count()

    async def warmup_worker() -> None:
        while (n := next(warmup_counter)) < warmup_requests:
            await send_request(client, *request(n), time.perf_counter(), mode=mode, path=path)

    await asyncio.gather(*(warmup_worker() for _ in range(min(concurrency, warmup_requests))))

    records: list[RequestRecord] = []
    label = f"ipr={inputs_per_request} conc={concurrency} rate={request_rate:g}"
    progress = tqdm(total=num_requests, desc=label, unit="req", disable=not show_progress,
                    file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    deadline = start + duration if duration is not None else math.inf
    counter = itertools.count(warmup_requests)
    limit = warmup_requests + num_requests if num_requests is not None else math.inf

    async def send_and_record(n: int) -> None:
        records.append(await send_request(client, *request(n), start, reference, check_threshold,
                                          mode=mode, path=path))
        progress.update(1)

    async def closed_loop_worker() -> None:
        while (n := next(counter)) < limit and time.perf_counter() < deadline:
            await send_and_record(n)

    async def open_loop() -> None:
        # Gaps between arrivals come from a seeded generator, so every run of
        # a point offers the server the same schedule.
        arrivals = random.Random(seed)
        in_flight = asyncio.Semaphore(concurrency)
        tasks = []

        async def limited(n: int) -> None:
            async with in_flight:
                await send_and_record(n)

        next_arrival = start
        while (n := next(counter)) < limit and next_arrival < deadline:
            delay = next_arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(n)))
            next_arrival += arrivals.expovariate(request_rate)
        await asyncio.gather(*tasks)

    cpu_start = time.process_time()
    try:
        if math.isinf(request_rate):
            await asyncio.gather(*(closed_loop_worker() for _ in range(concurrency)))
        else:
            await open_loop()
    finally:
        progress.close()
    wall_time = time.perf_counter() - start
    client_cpu = time.process_time() - cpu_start
    rerank_fields = {"top_n": top_n, "return_documents": return_documents} if mode == "rerank" else {}
    return {
        "mode": mode,
        "inputs_per_request": inputs_per_request,  # rerank: documents per request
        "concurrency": concurrency,
        "request_rate": request_rate,
        "encoding_format": encoding_format,
        "dimensions": dimensions,
        **rerank_fields,
        "warmup_requests": warmup_requests,
        **summarise(records, wall_time),
        # Near 100% means this Python client, not the server, limited throughput.
        "client_cpu_percent": 100.0 * client_cpu / wall_time if wall_time > 0 else None,
    }


# ---------------------------------------------------------------------------
# Environment: machine and software under test
# ---------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict:
    """GPU name, memory and clocks via NVML; {"gpus": [], "nvml_error": ...} without NVML."""
    try:
        import pynvml  # from nvidia-ml-py; optional
        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, ...
        return {"gpus": [], "nvml_error": f"{type(exc).__name__}: {exc}"}

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpu = {"index": i, "name": text(pynvml.nvmlDeviceGetName(handle)),
                   "memory_total_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20}
            # Clock queries are unsupported on some parts (e.g. MIG slices): best effort each.
            for key, query, clock in [
                ("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM),
                ("sm_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM),
                ("mem_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM),
                ("mem_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_MEM),
            ]:
                try:
                    gpu[key] = query(handle, clock)
                except pynvml.NVMLError:
                    gpu[key] = None
            gpus.append(gpu)
        return {"gpus": gpus, "driver_version": text(pynvml.nvmlSystemGetDriverVersion())}
    except Exception as exc:
        return {"gpus": [], "nvml_error": f"{type(exc).__name__}: {exc}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def machine_info() -> dict:
    """Description of the machine running this script, for the JSON result."""
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        **gpu_info(),
    }


async def server_info(client: httpx.AsyncClient) -> dict:
    """Whatever the server says about itself (best effort): /v1/models, /version, /info (TEI)."""
    info = {}
    for path in ("/v1/models", "/version", "/info"):
        try:
            response = await client.get(path)
        except httpx.HTTPError as exc:
            info[path] = {"error": type(exc).__name__}
            continue
        if response.status_code != 200:
            info[path] = {"status": response.status_code}
            continue
        try:
            info[path] = response.json()
        except ValueError:
            info[path] = response.text[:2000]
    return info


def first_model_id(models_response) -> str | None:
    try:
        return models_response["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        return None


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def json_safe(value):
    """Make a result strict-JSON: inf -> "inf" (closed-loop rate), NaN -> None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_table(points: list[dict]) -> str:
    columns = [  # (header, key, format)
        ("ipr", "inputs_per_request", "{}"), ("conc", "concurrency", "{}"),
        ("rate", "request_rate", "{:g}"), ("reqs", "num_requests", "{}"),
        ("req/s", "requests_per_s", "{:.1f}"), ("inputs/s", "inputs_per_s", "{:.1f}"),
        ("tok/s", "tokens_per_s", "{:.0f}"), ("p50ms", "latency_p50_ms", "{:.1f}"),
        ("p90ms", "latency_p90_ms", "{:.1f}"), ("p99ms", "latency_p99_ms", "{:.1f}"),
        ("mean_ms", "latency_mean_ms", "{:.1f}"), ("mism", "mismatches", "{}"),
        ("min_cos", "min_cosine", "{:.6f}"), ("cli_cpu%", "client_cpu_percent", "{:.0f}"),
    ]
    rows = [[h for h, _, _ in columns] + ["errors"]]
    for p in points:
        row = ["-" if p[key] is None else fmt.format(p[key]) for _, key, fmt in columns]
        row.append(",".join(f"{k}:{v}" for k, v in p["errors"].items()) or "0")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def plot_points(points: list[dict], path: str, title: str = "") -> None:
    """PNG: inputs/s (rerank: documents/s) and p99 latency against concurrency, one line per
    inputs-per-request (and rate)."""
    import matplotlib  # lazy: everything else works without matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[dict]] = {}
    for p in points:
        series.setdefault((p["inputs_per_request"], p["request_rate"]), []).append(p)
    several_rates = len({rate for _, rate in series}) > 1
    inputs = "documents" if any(p.get("mode") == "rerank" for p in points) else "inputs"
    fig, (ax_throughput, ax_latency) = plt.subplots(1, 2, figsize=(11, 4.5))

    def nan_if_none(v):
        return math.nan if v is None else v

    for (ipr, rate), group in sorted(series.items()):
        group.sort(key=lambda p: p["concurrency"])
        x = [p["concurrency"] for p in group]
        name = f"{ipr} {inputs}/req" + (f", {rate:g} req/s" if several_rates else "")
        ax_throughput.plot(x, [nan_if_none(p["inputs_per_s"]) for p in group], marker="o", label=name)
        ax_latency.plot(x, [nan_if_none(p["latency_p99_ms"]) for p in group], marker="o", label=name)
    concurrencies = sorted({p["concurrency"] for p in points})
    for ax, ylabel in ((ax_throughput, f"{inputs}/s"), (ax_latency, "p99 latency (ms)")):
        if len(concurrencies) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def positive_int_list(text: str) -> list[int]:
    """'1,8' -> [1, 8]; argparse type for sweep flags."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def rate_list(text: str) -> list[float]:
    """'inf,50' -> [inf, 50.0]; argparse type for --request-rate."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or inf, got {text!r}")
    if any(not v > 0 for v in values):  # also rejects nan
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return values


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"truncate_prompt_tokens\": 256}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="server root; a trailing /v1 is accepted (default: %(default)s)")
    server.add_argument("--model", help="model name sent in each request; default: first id of GET /v1/models")
    server.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    server.add_argument("--label", default="", help="free text naming the software under test, stored in the JSON")
    server.add_argument("--timeout", type=float, default=60.0,
                        help="per-request timeout, seconds (default: %(default)s)")
    server.add_argument("--mode", choices=MODES, default="embed",
                        help="embed: POST /v1/embeddings with inputs-per-request texts; rerank: POST "
                             "--rerank-path with one query and inputs-per-request documents (default: %(default)s)")
    server.add_argument("--rerank-path", default=RERANK_PATH,
                        help="the rerank route, --mode rerank (default: %(default)s; vLLM also serves /rerank, "
                             "Cohere's API is /v2/rerank)")

    data = parser.add_argument_group("inputs")
    data.add_argument("--dataset", help="file with one text per line, or .jsonl with a 'text' field; "
                                        "default: synthetic texts (--mode rerank: the documents)")
    data.add_argument("--queries", metavar="FILE",
                      help="--mode rerank: the queries, one per line or .jsonl with a 'text' field, request n "
                           f"taking query n modulo their number; default: {DEFAULT_NUM_SYNTHETIC_QUERIES} synthetic "
                           f"queries of {SYNTHETIC_QUERY_WORDS[0]}-{SYNTHETIC_QUERY_WORDS[1]} words")
    data.add_argument("--images", metavar="DIR|synthetic[:WxH]",
                      help="send images instead of texts, each input an item {\"image\": data URI} (tp-embed's "
                           "format for CLIP and GME): the image files of DIR, or synthetic JPEGs of WxH pixels "
                           "(default 640x480); embed mode only")
    data.add_argument("--num-texts", type=int, default=None,
                      help=f"number of synthetic texts (default {DEFAULT_NUM_SYNTHETIC_TEXTS}; --mode rerank: "
                           f"documents) or images (default {DEFAULT_NUM_SYNTHETIC_IMAGES}); with --dataset or an "
                           "--images DIR, use only the first N")
    data.add_argument("--synthetic-min-words", type=int, default=8,
                      help="shortest synthetic text, words (default: %(default)s)")
    data.add_argument("--synthetic-max-words", type=int, default=128,
                      help="longest synthetic text, words (default: %(default)s)")
    data.add_argument("--seed", type=int, default=0,
                      help="seed for synthetic texts and images and Poisson arrivals (default: %(default)s)")

    load = parser.add_argument_group("load (list flags sweep: every combination is one point)")
    load.add_argument("--inputs-per-request", type=positive_int_list, default="1",
                      help="inputs (texts or images) per request, comma-separated sweep, e.g. 1,32; "
                           "--mode rerank: documents per request, each request also carrying one query "
                           "(default: %(default)s)")
    load.add_argument("--concurrency", type=positive_int_list, default="1",
                      help="closed loop: number of workers; open loop: cap on requests in flight; "
                           "comma-separated sweep, e.g. 1,8 (default: %(default)s)")
    load.add_argument("--request-rate", type=rate_list, default="inf",
                      help="requests/s with Poisson arrivals, comma-separated sweep; "
                           "inf = closed loop (default: %(default)s)")
    stop = load.add_mutually_exclusive_group()
    stop.add_argument("--num-requests", type=int, help=f"timed requests per point (default {DEFAULT_NUM_REQUESTS})")
    stop.add_argument("--duration", type=float, help="seconds of sending per point, instead of --num-requests")
    load.add_argument("--warmup-requests", type=int, default=10,
                      help="untimed requests before each point (default: %(default)s)")

    request = parser.add_argument_group("request body")
    request.add_argument("--encoding-format", choices=["float", "base64"], default=None,
                         help="embedding encoding asked of the server (default: float); embed mode only")
    request.add_argument("--dimensions", type=int,
                         help="'dimensions' field (Matryoshka truncation); embed mode only")
    request.add_argument("--top-n", type=int,
                         help="--mode rerank: 'top_n' field, the server returns only the N best documents "
                              "(default: not sent, all documents)")
    request.add_argument("--return-documents", action="store_true",
                         help="--mode rerank: send 'return_documents': true (default false) and check that each "
                              "result carries the document sent")
    request.add_argument("--extra-body", type=json_object, default="{}",
                         help="JSON object merged into each request body, "
                              "e.g. '{\"truncate_prompt_tokens\": 256}' for vLLM")

    check = parser.add_argument_group("correctness")
    check.add_argument("--check", metavar="REF.npy",
                       help="reference vectors, row i = text i; every returned vector is compared by cosine "
                            "(embed mode only)")
    check.add_argument("--check-threshold", type=float, default=0.9999,
                       help="cosine below this counts as a mismatch (default: %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--output-json", help="write machine, software, config and per-point results here")
    output.add_argument("--plot", help="write a PNG of inputs/s and p99 latency against concurrency (needs matplotlib)")
    output.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_texts", "num_requests", "dimensions", "synthetic_min_words", "top_n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.synthetic_max_words < args.synthetic_min_words:
        parser.error("--synthetic-max-words must be >= --synthetic-min-words")
    if args.images is not None:
        if args.dataset is not None:
            parser.error("--images and --dataset are alternatives: give one")
        try:
            check_image_source(args.images)
        except ValueError as e:
            parser.error(f"--images: {e}")
    if args.duration is not None and not args.duration > 0:
        parser.error("--duration must be > 0")
    if args.warmup_requests < 0:
        parser.error("--warmup-requests must be >= 0")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.mode == "rerank":
        for flag, value, why in (
                ("--check", args.check, "it compares returned vectors, and a rerank response has scores"),
                ("--images", args.images, "rerank requests carry text documents"),
                ("--dimensions", args.dimensions, "it asks for shorter vectors"),
                ("--encoding-format", args.encoding_format, "it asks for a vector encoding")):
            if value is not None:
                parser.error(f"{flag} is for --mode embed only ({why})")
        if not args.rerank_path.startswith("/"):
            args.rerank_path = "/" + args.rerank_path
    else:
        for flag, value in (("--queries", args.queries), ("--top-n", args.top_n),
                            ("--return-documents", args.return_documents or None)):
            if value is not None:
                parser.error(f"{flag} is for --mode rerank only")
        if args.encoding_format is None:
            args.encoding_format = "float"
    if args.duration is None and args.num_requests is None:
        args.num_requests = DEFAULT_NUM_REQUESTS
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    return args


def load_texts(args: argparse.Namespace) -> list:
    """The inputs the requests cycle through: texts (rerank: documents), or image items with --images."""
    if getattr(args, "images", None):
        return load_images(args.images, args.num_texts, args.seed)
    if args.dataset:
        return load_dataset(args.dataset)[:args.num_texts]  # [:None] keeps all
    return synthetic_texts(args.num_texts or DEFAULT_NUM_SYNTHETIC_TEXTS,
                           args.synthetic_min_words, args.synthetic_max_words, args.seed)


def software_versions() -> dict:
    return {"python": platform.python_version(), "httpx": httpx.__version__, "numpy": np.__version__}


async def run_benchmark(args: argparse.Namespace, texts: list[str], reference: np.ndarray | None,
                        queries: list[str] | None = None) -> dict:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    max_concurrency = max(args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=args.timeout,
        limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        trust_env=False,  # a proxy from the environment would be benchmarked too
    ) as client:
        server = await server_info(client)
        model = args.model or first_model_id(server.get("/v1/models"))
        if model is None:
            raise SystemExit(f"--model not given and GET {args.base_url}/v1/models named no model: "
                             f"{server.get('/v1/models')}")
        points = []
        for inputs_per_request, concurrency, rate in itertools.product(
                args.inputs_per_request, args.concurrency, args.request_rate):
            points.append(await run_point(
                client, texts, model=model, inputs_per_request=inputs_per_request,
                concurrency=concurrency, request_rate=rate, num_requests=args.num_requests,
                duration=args.duration, warmup_requests=args.warmup_requests,
                encoding_format=args.encoding_format, dimensions=args.dimensions,
                extra_body=args.extra_body, reference=reference,
                check_threshold=args.check_threshold, seed=args.seed,
                show_progress=not args.no_progress, mode=args.mode, queries=queries,
                rerank_path=args.rerank_path, top_n=args.top_n, return_documents=args.return_documents))
    return {
        "started_at": started_at,
        "label": args.label,
        "base_url": args.base_url,
        "model": model,
        "machine": machine_info(),
        "software": {"client": software_versions(), "server": server},
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "num_texts": len(texts),  # rerank: documents
        "num_queries": len(queries) if queries is not None else None,
        "points": points,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep described by argv (sys.argv[1:] if None); print, save and return the results."""
    args = parse_args(argv)
    texts = load_texts(args)
    queries = load_queries(args.queries, args.seed) if args.mode == "rerank" else None
    reference = None
    if args.check:
        reference = np.load(args.check)
        if reference.ndim != 2 or len(reference) < len(texts):
            raise SystemExit(f"{args.check}: need a 2-D array with >= {len(texts)} rows, got {reference.shape}")
    result = asyncio.run(run_benchmark(args, texts, reference, queries))
    print(format_table(result["points"]))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(json_safe(result), f, indent=2, allow_nan=False)
    if args.plot:
        try:
            plot_points(result["points"], args.plot, title=args.label or result["model"])
        except ImportError:
            print("--plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
