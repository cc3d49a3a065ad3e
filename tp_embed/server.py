"""Rank 0's HTTP server: the OpenAI embeddings API on FastAPI/uvicorn, in front of the engine thread.

    handler (event loop)    auth, readiness, read the body (size limit)
    tokenizer pool          parse JSON, validate, tokenize (one tokenizer copy per thread)
    handler                 admit into the scheduler (429 over --max-queued-tokens), await the result,
                            or the client's disconnect, or --request-timeout
    engine thread           packs, broadcasts, runs the shard, pools (tp_embed/scheduler.py)
    handler                 Matryoshka truncation, normalization, serialization (the pool for big ones)

The event loop never computes, and only the engine thread issues collectives. SIGTERM/SIGINT drain:
admission stops with 503, queued and in-flight requests finish (up to --shutdown-timeout), the workers
get STOP, and the process exits 0. An engine failure fails every request with 503 and exits non-zero.
"""

import asyncio
import copy
import hmac
import inspect
import json
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tp_embed import __version__, cohere_embed, tei
from tp_embed.asgi import StatusSend
from tp_embed.config import ConfigError, EngineConfig
from tp_embed.engine import Engine
from tp_embed.items import Item
from tp_embed.media import MediaConfig, MediaError, load_images
from tp_embed.metrics import Metrics
from tp_embed.openai_protocol import (
    ERROR_TYPES,
    MAX_INPUTS,
    APIError,
    EmbeddingRequest,
    TokenizeRequest,
    check_encoding_format,
    check_text,
    check_token_ids,
    non_finite_error,
    parse_input,
    parse_items,
    parse_json_body,
    render_embeddings,
    render_outputs,
    request_prompt,
)
from tp_embed.pooling import MatryoshkaError, check_dimensions, combine_windows, truncate_and_normalize
from tp_embed.scheduler import EngineDeadError, Job, QueueFullError, Scheduler, ShuttingDownError
from tp_embed.scoring import ScoringModel, check_task, prepare_classify, prepare_rerank, prepare_score
from tp_embed.text import InputTooLongError, LengthPolicy
from tp_embed.token_heads import OUTPUTS, POOLED, dense_sparse, lexical_weights, unused_token_ids
from tp_embed.tracing import API_ROUTES, OFF, RequestTraceMiddleware, TracingError, request_trace, start_tracing

logger = logging.getLogger("tp_embed")
FASTAPI_TELEMETRY = "telemetry" in inspect.signature(FastAPI.__init__).parameters

# every route /metrics counts by name: the API's (which tracing and the request log follow too) and the others
ROUTES = API_ROUTES | {"/v1/models", "/health", "/metrics", "/info"}
# responses with more floats than this are serialized in the pool instead of on the event loop (~1 ms)
INLINE_RENDER_FLOATS = 16384


@dataclass(slots=True)
class PreparedEmbedding:
    sequences: list[list[int]]
    num_tokens: int
    dimensions: int | None
    normalize: bool
    encoding_format: str
    order: list[int] | None  # sequences[j] is input order[j]; None when in input order
    items: list | None = None  # multimodal items as the model's processor prepared them
    # chunked inputs (--long-inputs chunk): each input's number of windows and each window's tokens, in input
    # order (the sequences are the windows); None when every input is one sequence
    windows: tuple[list[int], list[int]] | None = None
    output: str = "dense"  # or sparse or colbert (EmbeddingRequest.output)


class EmbeddingServer:
    def __init__(self, args, metrics: Metrics):
        self.args = args
        self.media_config = MediaConfig.from_args(args)
        self.metrics = metrics
        self.tracing = OFF  # serve() sets what --otlp-traces-endpoint and --log-requests ask for
        self.calibration_ranges = None  # serve() loads --embedding-calibration: float32 [2, dim] for /v2/embed
        self.state = "loading"  # -> ready -> draining, or -> failed; changed on the event loop only
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.uvicorn: uvicorn.Server | None = None
        self.engine = None
        self.pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._shutdown_started = False
        self.created = int(time.time())
        self.scheduler = Scheduler(self._build_engine, self._deliver, self._on_ready, self._on_fatal,
                                   heartbeat_interval=min(5.0, args.dist_timeout / 4), metrics=metrics)
        metrics.watch_scheduler(self.scheduler)

    # ---- engine thread callbacks ----

    def _build_engine(self) -> Engine:
        engine = Engine(EngineConfig.from_args(self.args))
        self.check_calibration(engine)
        engine.warmup()
        engine.forward_pooled([[0] * 4])  # the single-sequence attention path too
        self.served_model_name = self.args.served_model_name or engine.model_name
        self.scoring = ScoringModel(self.served_model_name, engine.tasks, engine.config.head,
                                    self.args.max_rerank_documents, self.args.allow_auto_truncate)
        self.scheduler.max_queued_tokens = self.args.max_queued_tokens or 64 * engine.max_batch_tokens
        if engine.device.type == "cuda":
            self.metrics.watch_gpus(min(engine.dist.tp_size, torch.cuda.device_count()))
        self.engine = engine
        self.unused_token_ids = unused_token_ids(engine.text.tokenizer)  # bge-m3's sparse vectors leave out
        n = self.args.tokenizer_workers
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="tp-embed-tokenizer", initializer=self._init_thread)
        barrier = threading.Barrier(n)  # start every thread now, so no request waits for a tokenizer copy
        for f in [self.pool.submit(barrier.wait) for _ in range(n)]:
            f.result()
        return engine

    def check_calibration(self, engine: Engine) -> None:
        """--embedding-calibration must fit the vectors this model returns: a wrong file stops the ranks and
        fails startup (exit 2), rather than every int8 request."""
        if self.calibration_ranges is None:
            return
        try:
            cohere_embed.check_calibration(self.calibration_ranges, self.args.embedding_calibration, engine.model_name,
                                           engine.embedding_size if "embed" in engine.tasks else None)
        except ConfigError:
            for lane in engine.groups():
                lane.stop_workers()
            raise

    def _init_thread(self) -> None:
        # transformers' fast tokenizers change their truncation state on each call, which races between
        # threads ("Already borrowed"): every pool thread owns a copy.
        text = copy.copy(self.engine.text)
        text.tokenizer = copy.deepcopy(self.engine.text.tokenizer)
        self._local.text = text

    def _call_in_loop(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is already closed: nobody is waiting any more
            pass

    def _deliver(self, jobs: list[Job]) -> None:
        self._call_in_loop(_resolve_futures, jobs)

    def _on_ready(self, engine: Engine) -> None:
        self._call_in_loop(self._set_ready)

    def _on_fatal(self, error: BaseException) -> None:
        self._call_in_loop(self._fail, error)

    # ---- state, on the event loop ----

    def _set_ready(self) -> None:
        if self.state != "loading":
            return
        self.state = "ready"
        self.metrics.ready.set(1)
        e = self.engine
        shape = (f"{e.embedding_size} dimensions, pooling {e.pooling or 'its own'}, normalize {e.normalize}"
                 if e.config.head is None else f"labels {', '.join(e.config.head.labels[:8])}"
                 + (f" and {len(e.config.head.labels) - 8} more" if len(e.config.head.labels) > 8 else ""))
        logger.info("ready: %s as %r, tp=%d, %s, tasks %s, %s, context length %d, max batch %d tokens / %d inputs, "
                    "max queued tokens %d", e.model_name, self.served_model_name, e.dist.tp_size, e.dtype,
                    ", ".join(e.tasks), shape, e.text.max_length, e.max_batch_tokens, e.max_batch_seqs,
                    self.scheduler.max_queued_tokens)

    def _fail(self, error: BaseException) -> None:
        if isinstance(error, (ConfigError, SystemExit)):
            logger.error("%s", error)
            self.exit_code = 2
        else:
            # a failure while loading has not been logged yet (the engine thread logs later ones)
            logger.error("engine failed (%s: %s); exiting", type(error).__name__, error,
                         exc_info=error if self.state == "loading" else None)
            self.exit_code = 1
        self.state = "failed"
        self.metrics.ready.set(0)
        self.uvicorn.should_exit = True

    def begin_shutdown(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.state == "failed":  # already exiting after an error (torchrun then signals every rank): say nothing
            logger.debug("%s after the engine failed", name)
            return
        if self._shutdown_started:
            logger.info("%s: already shutting down (at most --shutdown-timeout %.0f s)", name,
                        self.args.shutdown_timeout)
            return
        self._shutdown_started = True
        logger.info("%s: draining %d requests, then stopping", name, self.scheduler.num_active)
        if self.state in ("loading", "ready"):
            self.state = "draining"
        self.metrics.ready.set(0)
        asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = self.loop.time() + self.args.shutdown_timeout
        while self.scheduler.num_active and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.scheduler.num_active:
            logger.warning("--shutdown-timeout %.0f s passed: failing %d unfinished requests",
                           self.args.shutdown_timeout, self.scheduler.num_active)
            self.scheduler.fail_all(ShuttingDownError("the server shut down before this request finished"))
        self.uvicorn.should_exit = True

    async def stop_engine(self) -> None:
        """After uvicorn has stopped: STOP the workers (from the engine thread) and wait for it."""
        self.scheduler.stop()
        if not await asyncio.to_thread(self.scheduler.join, self.args.shutdown_timeout):
            logger.error("the engine thread did not stop within %.0f s", self.args.shutdown_timeout)
            self.exit_code = self.exit_code or 1
        if self.scheduler.dead and not self.exit_code:
            self.exit_code = 1
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- request helpers ----

    def authorize(self, request: Request) -> None:
        key = self.args.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "no API key provided: send it as 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_ready(self) -> None:
        if self.state != "ready":
            message = {"loading": "the model is still loading; retry when GET /health answers 200",
                       "draining": "the server is shutting down and accepts no new requests",
                       "failed": "the engine failed and the server is exiting"}[self.state]
            raise APIError(503, message, code="server_not_ready")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves "
                                f"'{self.served_model_name}'", param="model", code="model_not_found")

    async def read_body(self, request: Request) -> bytes:
        limit = self.args.max_request_bytes
        length = request.headers.get("content-length")
        too_large = f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes)"
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, too_large, code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, too_large, code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def prepare_embeddings(self, body: bytes, parse=None) -> PreparedEmbedding:
        """Tokenizer pool: everything that can reject a request, so that nothing after it can. `parse` turns
        the body into an EmbeddingRequest (default: /v1/embeddings' schema; TEI's /embed has its own)."""
        t0 = time.perf_counter()
        req = parse(body) if parse is not None else parse_json_body(body, EmbeddingRequest)
        self.check_model(req.model)
        output = self.check_output(req)
        check_encoding_format(req.encoding_format)
        engine = self.engine
        try:
            check_dimensions(req.dimensions, engine.embedding_size, engine.matryoshka_dimensions, engine.is_matryoshka)
        except MatryoshkaError as e:
            raise APIError(400, str(e), param="dimensions") from None
        text = self._local.text
        policy = self.length_policy(req, text.max_length)
        items = parse_items(req.input)
        if items is not None and engine.processor is not None:
            if output != "dense":
                raise APIError(400, f"output {output} takes text or token ids, not items", param="input")
            if policy.limit is not None or policy.side != "right":
                raise APIError(400, "truncate_prompt_tokens and truncation_side apply to text and token-id inputs, "
                                    "not to items", param="truncate_prompt_tokens")
            prepared = self.prepare_items(req, items, policy.mode == "truncate")
            # usage and the queue budget count what the batches will hold: text, template and image tokens
            return self.prepared(req, t0, [], engine.prepared_tokens(prepared), items=prepared)
        if items is not None:  # a text-only model takes items that hold text only
            images = [i for i, (_, image) in enumerate(items) if image is not None]
            if images:
                raise APIError(400, f"input[{images[0]}] has an image, but {self.served_model_name} embeds "
                                    f"text only", param="input", code="images_not_supported")
            req.input = [t for t, _ in items]
        if req.instruction is not None:
            raise APIError(400, "instruction applies to models with a chat template (GME, "
                                "--chat-template gme-qwen2-vl); use prompt_name for this model", param="instruction")
        windows = self.encode_inputs(req, policy, text)
        sequences = [s for w in windows for s in w]
        chunks = None
        if len(sequences) > len(windows):
            chunks = [len(w) for w in windows], [len(s) for s in sequences]
        num_tokens = sum(map(len, sequences))
        order = None
        if num_tokens > engine.max_batch_tokens:
            # split over several batches: sorted by length, each batch pads its attention less (SDPA)
            order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
            sequences = [sequences[i] for i in order]
        return self.prepared(req, t0, sequences, num_tokens, order, windows=chunks, output=output)

    def check_output(self, req: EmbeddingRequest) -> str:
        """The request's `output` (dense, sparse or colbert) once the model gives it and the request's other
        fields apply to it."""
        output = req.output or "dense"
        if output == "dense" and "embed" not in self.engine.tasks and "sparse" in self.engine.tasks:
            raise APIError(400, f"{self.served_model_name} gives sparse vectors only: ask for them with "
                                f"\"output\": \"sparse\" (or TEI's POST /embed_sparse)", param="output",
                           code="task_not_supported")
        check_task(self.scoring, "embed" if output == "dense" else output)
        if output == "dense":
            return output
        for name in ("dimensions", "normalize", "instruction"):
            if getattr(req, name) is not None:
                raise APIError(400, f"{name} applies to dense vectors, not to output {output}", param=name)
        if output == "sparse" and req.encoding_format != "float":
            raise APIError(400, "sparse vectors are sent as indices and values: use encoding_format float",
                           param="encoding_format")
        return output

    def encode_inputs(self, req: EmbeddingRequest, policy: LengthPolicy, text) -> list[list[list[int]]]:
        """The request's texts or token ids as the sequences to embed, one or more windows per input."""
        texts, sequences = parse_input(req.input)
        try:
            if texts is not None:
                windows = text.encode_windows(texts, policy, request_prompt(text, req.prompt_name))
                for i, ids in enumerate(windows):
                    if not ids[0]:
                        raise APIError(400, f"input[{i}] has no tokens after tokenization", param="input")
                return windows
            if req.prompt_name is not None:
                raise APIError(400, "prompt_name applies to text inputs; token-id inputs must already "
                                    "hold the prompt's tokens", param="prompt_name")
            check_token_ids(sequences, self.engine.config.vocab_size, nested=isinstance(req.input[0], list))
            return text.fit_token_ids(sequences, policy)
        except InputTooLongError as e:
            raise APIError(400, str(e), param="input", code="context_length_exceeded") from None
        except ValueError as e:  # a limit that leaves no room for the text
            raise APIError(400, str(e), param="input") from None

    def prepared(self, req: EmbeddingRequest, t0: float, sequences: list, num_tokens: int,
                 order: list[int] | None = None, items: list | None = None,
                 windows: tuple | None = None, output: str = "dense") -> PreparedEmbedding:
        """A request's PreparedEmbedding, its preparation since t0 observed as its tokenize time."""
        self.metrics.tokenize_latency.observe(time.perf_counter() - t0)
        normalize = req.normalize if req.normalize is not None else self.engine.normalize
        return PreparedEmbedding(sequences, num_tokens, req.dimensions, normalize, req.encoding_format, order, items,
                                 windows, output)

    def length_policy(self, req: EmbeddingRequest, context_length: int) -> LengthPolicy:
        """What this request does with a long input: --long-inputs, unless it says otherwise with `truncate`
        (true: truncate, false: refuse), `long_inputs`, or `truncate_prompt_tokens` (truncate to N tokens;
        with `truncate: false`, refuse more than N)."""
        if req.truncate is not None and req.long_inputs is not None:
            raise APIError(400, "give truncate or long_inputs, not both", param="long_inputs")
        mode = req.long_inputs or self.args.long_inputs
        if req.truncate is not None:
            mode = "truncate" if req.truncate else "error"
        limit, n = None, req.truncate_prompt_tokens
        if n is not None:
            if mode == "chunk" and req.long_inputs is not None:
                raise APIError(400, "truncate_prompt_tokens truncates; it does not go with long_inputs chunk",
                               param="truncate_prompt_tokens")
            if n != -1 and not 1 <= n <= context_length:
                raise APIError(400, f"truncate_prompt_tokens must be -1 (the context length) or between 1 and "
                                    f"{context_length}, got {n}", param="truncate_prompt_tokens")
            limit = None if n == -1 else n
            mode = "error" if req.truncate is False else "truncate"
        if mode == "chunk" and self.engine.pooling is None:
            raise APIError(400, f"long_inputs chunk combines pooled vectors; {self.served_model_name} pools its own "
                                f"outputs", param="long_inputs")
        return LengthPolicy(mode, limit, req.truncation_side or "right", self.args.max_input_tokens)

    def prepare_items(self, req: EmbeddingRequest, items: list, truncate: bool) -> list:
        """Tokenizer pool: fetch and decode every image, then the model's processor tokenizes, renders
        prompts and preprocesses images (all off the event loop and the engine thread) into its prepared
        inputs; a bad item is a 400 that names it."""
        if req.prompt_name is not None:
            raise APIError(400, "prompt_name applies to plain text inputs, not to items", param="prompt_name")
        if req.instruction is not None:
            check_text(req.instruction, "instruction", param="instruction")
        num_images = sum(ref is not None for _, ref in items)
        if num_images > self.args.max_request_images:
            raise APIError(400, f"input has {num_images} images; at most {self.args.max_request_images} are "
                                f"allowed per request (--max-request-images): send them in several requests",
                           param="input")
        loaded = []
        images = load_images([ref for _, ref in items], self.media_config)  # URLs fetched concurrently
        for i, ((text, _), image) in enumerate(zip(items, images)):
            if isinstance(image, MediaError):
                raise APIError(400, f"input[{i}].image: {image}", param="input", code="invalid_image")
            loaded.append(Item(text=text, image=image, instruction=req.instruction))
        try:
            return self.engine.prepare_items(loaded, truncate, self._local.text)
        except InputTooLongError as e:
            raise APIError(400, str(e), param="input", code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param="input") from None

    async def wait_for(self, job: Job, request: Request, deadline: float) -> None:
        """Until the job's result, the client's disconnect or the deadline; the last two drop the job."""
        disconnected = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            await asyncio.wait((job.future, disconnected), timeout=deadline - self.loop.time(),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
        if job.future.done():
            return
        self.scheduler.cancel(job)
        if disconnected.done() and not disconnected.cancelled():
            self.metrics.cancelled.labels("client_disconnected").inc()
            raise ClientDisconnected()
        self.metrics.cancelled.labels("timeout").inc()
        raise APIError(504, f"the request did not finish within {self.args.request_timeout:g} s "
                            f"(--request-timeout)", code="timeout")

    # ---- routes ----

    async def run_job(self, job: Job, request: Request, deadline: float) -> bool:
        """Admit the job, wait for it and raise its error as the API's; False when the client went away."""
        submitted = time.time_ns()  # the clock of the tracing spans and of job.started
        try:
            self.scheduler.submit(job)
        except QueueFullError as e:
            raise APIError(429, str(e), code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDownError:
            self.check_ready()
            raise APIError(503, "the server is not accepting requests", code="server_not_ready") from None
        except EngineDeadError as e:
            raise APIError(503, str(e), code="engine_failed") from None
        queued = time.perf_counter()
        try:
            await self.wait_for(job, request, deadline)
        except ClientDisconnected:
            request_trace(request).fail("client_disconnected")
            return False
        finally:
            request_trace(request).queued(submitted, job.started)
        if isinstance(job.error, ValueError):  # a bad item, found by the model's processor
            code = "context_length_exceeded" if isinstance(job.error, InputTooLongError) else None
            raise APIError(400, str(job.error), param="input", code=code)
        if job.error is not None:
            code = "engine_failed" if isinstance(job.error, EngineDeadError) else "server_not_ready"
            raise APIError(503, str(job.error), code=code)
        self.metrics.queue_latency.observe(time.perf_counter() - queued)
        return True

    async def embed_request(self, request: Request, parse=None):
        """An embedding request's vectors, truncated and normalized as it asks, in its order, and its
        PreparedEmbedding; None when the client left before they were ready."""
        self.authorize(request)
        self.check_ready()
        loop = self.loop
        deadline = loop.time() + self.args.request_timeout
        body = await self.read_body(request)
        trace = request_trace(request)
        with trace.stage("tokenize"):
            prepared = await loop.run_in_executor(self.pool, self.prepare_embeddings, body, parse)
        if prepared.items is not None:
            job = Job([], prepared.num_tokens, loop.create_future(), prepared.items)
        else:
            head = OUTPUTS.get(prepared.output, POOLED)
            if self.engine.token_heads is None or head not in self.engine.token_heads.linears:
                head = POOLED  # a SPLADE model's sparse vectors are its pooled rows
            job = Job(prepared.sequences, prepared.num_tokens, loop.create_future(), output=head)
        trace.note(len(prepared.items if prepared.items is not None else prepared.sequences), prepared.num_tokens)
        if not await self.run_job(job, request, deadline):
            return None
        if prepared.output != "dense":  # rendered from these (token_results) in the tokenizer pool
            return self.in_input_order(job.outputs, prepared), prepared
        outputs = job.outputs
        if prepared.order is not None:
            outputs = torch.empty_like(outputs)
            outputs[prepared.order] = job.outputs
        if prepared.windows is not None:
            outputs = combine_windows(outputs, *prepared.windows, self.engine.pooling)
        return truncate_and_normalize(outputs, prepared.dimensions, prepared.normalize).numpy(), prepared

    async def serve_embeddings(self, request: Request, render, parse=None) -> Response:
        """Embed a request (its body read by `parse`, see prepare_embeddings) and answer render(vectors,
        prepared), in the tokenizer pool for a large response: /v1/embeddings, /embed, /v2/embed."""
        start = time.perf_counter()
        done = await self.embed_request(request, parse)
        if done is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        vectors, prepared = done
        with request_trace(request).stage("render"):
            if prepared.output != "dense" or vectors.size > INLINE_RENDER_FLOATS:
                content = await self.loop.run_in_executor(self.pool, render, vectors, prepared)
            else:
                content = render(vectors, prepared)
        self.observe_request(start, len(vectors), prepared.num_tokens)
        return Response(content, media_type="application/json")

    @staticmethod
    def in_input_order(outputs, prepared: PreparedEmbedding) -> tuple[list, list]:
        """A job's per-sequence outputs (a tensor's rows or a token head's list) and its sequences, in input
        order."""
        rows, sequences = list(outputs), prepared.sequences
        if prepared.order is None:
            return rows, sequences
        ordered_rows, ordered_sequences = [None] * len(rows), [None] * len(rows)
        for j, i in enumerate(prepared.order):
            ordered_rows[i], ordered_sequences[i] = rows[j], sequences[j]
        return ordered_rows, ordered_sequences

    def token_results(self, outputs: tuple[list, list], prepared: PreparedEmbedding) -> list:
        """Per input, in order: sparse (indices, values) or ColBERT float32 [tokens, dim], from the outputs of its
        sequences (several when it was chunked: the sparse weights of every window's tokens, the ColBERT vectors
        of each window after its first token, one window after another)."""
        rows, sequences = outputs
        counts = prepared.windows[0] if prepared.windows is not None else [1] * len(rows)
        results, j = [], 0
        for count in counts:
            seqs, outs = sequences[j:j + count], rows[j:j + count]
            j += count
            if not all(torch.isfinite(o).all() for o in outs):
                raise non_finite_error()
            if prepared.output == "colbert":
                results.append(torch.cat([o[1:] for o in outs]).numpy())
            elif outs[0].dim() == 1:  # a SPLADE model's vocabulary-sized row (never chunked: it pools itself)
                results.append(dense_sparse(outs[0].numpy()))
            else:
                results.append(lexical_weights([t for s in seqs for t in s], torch.cat(outs).numpy(),
                                               self.unused_token_ids))
        return results

    async def create_embeddings(self, request: Request):
        def render(vectors, prepared: PreparedEmbedding) -> bytes:
            if prepared.output == "dense":
                return render_embeddings(vectors, prepared.encoding_format, self.served_model_name,
                                         prepared.num_tokens)
            return render_outputs(self.token_results(vectors, prepared), prepared.output, prepared.encoding_format,
                                  self.served_model_name, prepared.num_tokens)

        return await self.serve_embeddings(request, render)

    async def tei_root(self, request: Request):
        """TEI's POST /, by the model's task: /embed_sparse for a model that gives sparse vectors only, else /embed
        (which answers a model that does not embed with the tasks it serves)."""
        if self.state == "ready" and "sparse" in self.engine.tasks and "embed" not in self.engine.tasks:
            return await self.tei_embed_sparse(request)
        return await self.tei_embed(request)

    async def in_tei_shape(self, request: Request, answer, when=lambda: True) -> Response:
        """await answer(), its APIError answered in text-embeddings-inference's error shape (tei.error_body)
        where when() says so once it is raised (routes that take either API's body), else raised on."""
        try:
            return await answer()
        except APIError as error:
            if not when():
                raise
            return error_response(error, self.metrics, request, tei.error_body(error))

    async def tei_embed_sparse(self, request: Request):
        """text-embeddings-inference's POST /embed_sparse: [[{"index", "value"}]] for a SPLADE model or bge-m3's
        sparse head; its error shape."""
        return await self.in_tei_shape(request, lambda: self.serve_embeddings(
            request, lambda outputs, prepared: tei.render_sparse(self.token_results(outputs, prepared)),
            tei.parse_embed_sparse_request))

    async def tei_embed(self, request: Request):
        """text-embeddings-inference's POST /embed (and POST /, which TEI dispatches by the model's task:
        check_task answers a model that does not embed): [[float]]; its error shape."""
        return await self.in_tei_shape(request, lambda: self.serve_embeddings(
            request, lambda vectors, _: tei.render_vectors(vectors), tei.parse_embed_request))

    async def cohere_v2_embed(self, request: Request):
        """Cohere's POST /v2/embed (tp_embed/cohere_embed.py): float, int8, uint8, binary, ubinary, base64
        (int8 and uint8 calibrated by --embedding-calibration when given)."""
        asked = {}

        def parse(body: bytes) -> EmbeddingRequest:
            embed, asked["request"], asked["texts"] = cohere_embed.parse_request(body, self._local.text.prompts)
            return embed

        return await self.serve_embeddings(request, lambda vectors, prepared: cohere_embed.render(
            vectors, asked["request"], asked["texts"], prepared.num_tokens, self.calibration_ranges), parse)

    async def tei_info(self, request: Request):
        """text-embeddings-inference's GET /info."""
        return await self.in_tei_shape(request, lambda: self.tei_info_response(request))

    async def tei_info_response(self, request: Request) -> Response:
        self.authorize(request)
        self.check_ready()
        engine = self.engine
        head = engine.config.head
        kind = tei.model_kind(engine.tasks, engine.pooling, dict(head.labels) if head is not None else None)
        return json_response(tei.info(self.served_model_name, str(engine.dtype).removeprefix("torch."), kind,
                                      engine.text.max_length if engine.text else engine.config.max_input_tokens,
                                      engine.max_batch_tokens, engine.max_batch_seqs,
                                      MAX_INPUTS, self.args.tokenizer_workers, __version__))

    async def run_task(self, request: Request, prepare) -> Response:
        """Rerank, score and classify: prepare(body, scoring model, text, check_model) in the tokenizer pool
        gives the sequences and the function that turns their rows into the response."""
        start = time.perf_counter()
        self.authorize(request)
        self.check_ready()
        deadline = self.loop.time() + self.args.request_timeout
        body = await self.read_body(request)
        trace = request_trace(request)
        t0 = time.perf_counter()
        with trace.stage("tokenize"):
            task = await self.loop.run_in_executor(
                self.pool, lambda: prepare(body, self.scoring, self._local.text, self.check_model))
        self.metrics.tokenize_latency.observe(time.perf_counter() - t0)
        job = Job(task.sequences, task.num_tokens, self.loop.create_future(), type_starts=task.type_starts)
        trace.note(len(task.sequences), task.num_tokens)
        if not await self.run_job(job, request, deadline):
            return Response(status_code=499)
        with trace.stage("render"):
            if not torch.isfinite(job.outputs).all():  # JSON has no NaN: say why rather than send invalid JSON
                raise non_finite_error()
            response = json_response(task.finish(job.outputs))
        self.observe_request(start, len(task.sequences), task.num_tokens)
        return response

    def observe_request(self, start: float, num_inputs: int, num_tokens: int) -> None:
        """A request answered 200: its inputs, tokens and latency since `start` into the metrics."""
        self.metrics.inputs.inc(num_inputs)
        self.metrics.prompt_tokens.inc(num_tokens)
        self.metrics.request_latency.observe(time.perf_counter() - start)

    async def rerank(self, request: Request):
        return await self.run_task(request, prepare_rerank)

    async def rerank_or_tei_rerank(self, request: Request):
        """POST /rerank: text-embeddings-inference's shape and errors for its body ("texts": tei.is_rerank_body,
        tei.prepare_rerank), else /v1/rerank's. An error before the body is read (401, 413, 503) takes
        /v1/rerank's shape."""
        shape = {}

        def prepare(body: bytes, *args):
            if not tei.is_rerank_body(body):
                return prepare_rerank(body, *args)
            shape["tei"] = True
            return tei.prepare_rerank(body, *args)

        return await self.in_tei_shape(request, lambda: self.run_task(request, prepare), when=lambda: "tei" in shape)

    async def score(self, request: Request):
        return await self.run_task(request, prepare_score)

    async def classify(self, request: Request):
        return await self.run_task(request, prepare_classify)

    def prepare_tokenize(self, body: bytes) -> dict:
        req = parse_json_body(body, TokenizeRequest)
        self.check_model(req.model)
        single = isinstance(req.prompt, str)
        texts = [req.prompt] if single else req.prompt
        for i, t in enumerate(texts):
            check_text(t, "prompt" if single else f"prompt[{i}]", param="prompt")
        if not texts:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        text = self._local.text
        ids = text.tokenizer(texts, add_special_tokens=req.add_special_tokens, truncation=False,
                             verbose=False)["input_ids"]  # counting a long prompt is what /tokenize is for
        return {"tokens": ids[0] if single else ids, "count": len(ids[0]) if single else [len(x) for x in ids],
                "max_model_len": text.max_length}

    async def tokenize(self, request: Request):
        """POST /tokenize: SGLang's shape ({"prompt"}), or text-embeddings-inference's for its body ("inputs":
        tei.is_tokenize_body, tei.tokenize), in its errors too. An error before the body is read (401, 413, 503)
        takes SGLang's shape."""
        self.authorize(request)
        self.check_ready()
        body = await self.read_body(request)
        trace = request_trace(request)
        shape = {}

        def prepare():
            if not tei.is_tokenize_body(body):
                return self.prepare_tokenize(body)
            shape["tei"] = True
            return tei.tokenize(body, self._local.text)

        async def answer() -> Response:
            with trace.stage("tokenize"):
                result = await self.loop.run_in_executor(self.pool, prepare)
            if "tei" in shape:
                counts = [len(tokens) for tokens in result]
            else:
                counts = result["count"] if isinstance(result["count"], list) else [result["count"]]
            trace.note(len(counts), sum(counts))
            with trace.stage("render"):
                return json_response(result)

        return await self.in_tei_shape(request, answer, when=lambda: "tei" in shape)

    def model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "tp-embed",
                "root": self.engine.model_name, "max_model_len": self.engine.text.max_length,
                "tasks": list(self.engine.tasks)}

    async def list_models(self, request: Request):
        self.authorize(request)
        self.check_ready()
        return json_response({"object": "list", "data": [self.model_card()]})

    async def retrieve_model(self, request: Request):
        model = request.path_params["model"]
        self.authorize(request)
        self.check_ready()
        self.check_model(model)
        return json_response(self.model_card())

    async def health(self, request: Request):
        status = {"ready": "ok", "draining": "shutting_down"}.get(self.state, self.state)
        return json_response({"status": status}, 200 if self.state == "ready" else 503)

    async def metrics_endpoint(self, request: Request):
        self.authorize(request)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class ClientDisconnected(Exception):
    pass


def _resolve_futures(jobs: list[Job]) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_result(None)


async def _wait_for_disconnect(receive) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


def json_response(obj, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json")


def error_response(error: APIError, metrics: Metrics, request: Request | None = None,
                   shape: tuple[int, bytes] | None = None) -> Response:
    """The error's response: OpenAI's shape, or `shape`'s (status, body) on routes that answer in another API's
    (text-embeddings-inference's: tei.error_body)."""
    status, body = shape or (error.status, error.body())
    metrics.errors.labels(str(status), error.code or "none").inc()
    if request is not None:  # for the request's span and log line
        request_trace(request).fail(error.code or ERROR_TYPES.get(error.status, "server_error"))
    return Response(body, status_code=status, headers=error.headers, media_type="application/json")


class MetricsMiddleware:
    """Counts every response by route and status (plain ASGI: a few microseconds per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = StatusSend(send)
        try:
            await self.app(scope, receive, send)
        finally:
            path = scope["path"]
            route = path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"
            self.metrics.requests.labels(route, str(send.status)).inc()


def build_app(server: EmbeddingServer) -> FastAPI:
    # no /docs or /openapi.json: every route but /health sits behind --api-key. FastAPI's own OpenTelemetry
    # (0.16x) off: tp-embed traces requests itself (tp_embed/tracing.py), and its per-request check of the
    # global providers cost about 5% of the event loop's time on small inputs
    options = {"telemetry": {"tracing": False, "metrics": False, "logs": False}} if FASTAPI_TELEMETRY else {}
    app = FastAPI(title="tp-embed", docs_url=None, redoc_url=None, openapi_url=None, **options)
    app.add_route("/v1/embeddings", server.create_embeddings, methods=["POST"])
    app.add_route("/v1/models", server.list_models, methods=["GET"])
    app.add_route("/v1/models/{model:path}", server.retrieve_model, methods=["GET"])
    for path, route in (("/v1/rerank", server.rerank), ("/rerank", server.rerank_or_tei_rerank),
                        ("/v2/rerank", server.rerank),
                        ("/v1/score", server.score), ("/score", server.score),
                        ("/v1/classify", server.classify), ("/classify", server.classify)):
        app.add_route(path, route, methods=["POST"])
    app.add_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_route("/v2/embed", server.cohere_v2_embed, methods=["POST"])
    app.add_route("/embed", server.tei_embed, methods=["POST"])  # text-embeddings-inference's (tp_embed/tei.py)
    app.add_route("/", server.tei_root, methods=["POST"])
    app.add_route("/embed_sparse", server.tei_embed_sparse, methods=["POST"])
    app.add_route("/info", server.tei_info, methods=["GET"])
    app.add_route("/health", server.health, methods=["GET"])
    app.add_route("/metrics", server.metrics_endpoint, methods=["GET"])
    metrics = server.metrics

    async def on_api_error(request: Request, error: APIError):
        return error_response(error, metrics, request)

    async def on_http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = f"invalid URL ({request.method} {request.url.path})"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return error_response(APIError(error.status_code, message), metrics, request)

    async def on_unexpected_error(request: Request, error: Exception):
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(error).__name__})",
                                       code="internal_error"), metrics)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    if server.tracing.enabled:  # inside MetricsMiddleware; not installed at all when both flags are off
        app.add_middleware(RequestTraceMiddleware, tracing=server.tracing,
                           model=lambda: getattr(server, "served_model_name", None))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


class UvicornServer(uvicorn.Server):
    """uvicorn stops at once on a signal and re-raises it at exit (status 128+n); tp-embed drains first,
    stops the workers and exits 0."""

    def __init__(self, config: uvicorn.Config, server: EmbeddingServer):
        super().__init__(config)
        self.embedding_server = server

    def handle_exit(self, sig, frame) -> None:
        # runs in the main thread, which is the event loop's: schedule, don't act here
        self.embedding_server.loop.call_soon_threadsafe(self.embedding_server.begin_shutdown, sig)


def serve(args) -> int:
    """Rank 0: listen at once (so /health can say 503 while the shard loads), build the engine on the
    engine thread, serve until a signal or an engine failure. Returns the exit status."""
    metrics = Metrics()
    server = EmbeddingServer(args, metrics)
    try:  # read once, here on rank 0; its size is checked against the model's when the engine is built
        server.calibration_ranges = cohere_embed.load_calibration(args.embedding_calibration)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    try:
        server.tracing = start_tracing(args.otlp_traces_endpoint, args.log_requests)
    except TracingError as e:
        logger.error("%s", e)
        return 2
    config = uvicorn.Config(build_app(server), log_level=args.log_level, access_log=args.access_log,
                            lifespan="off", timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it
        # Nagle holds the body behind the headers for the client's delayed ACK (40 ms a request).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 2
    host, port = sock.getsockname()[:2]
    logger.info("listening on http://%s:%d (rank 0, pid %d); loading the model", host, port, os.getpid())
    userver = UvicornServer(config, server)

    async def main() -> None:
        server.loop = asyncio.get_running_loop()
        server.uvicorn = userver
        server.scheduler.start()
        await userver.serve(sockets=[sock])
        await server.stop_engine()
        await asyncio.to_thread(server.tracing.shutdown)  # export the last spans (at most 5 s)

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())
    return server.exit_code


def event_loop_factory():
    """uvloop's event loop where it is installed (`pip install "tp-embed[fast]"`, with httptools: about 1.2x the
    requests a second of short inputs over asyncio and h11, docs/performance.md), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
