"""Request tracing (OpenTelemetry over OTLP/HTTP, --otlp-traces-endpoint) and the request log (--log-requests).

The server asks three things of this module:

    app = RequestTraceMiddleware(app, tracing, model)    # one record (and span) per API request
    with request_trace(request).stage("tokenize"): ...   # a child span around one stage of the request
    request_trace(request).note(inputs, tokens)          # what the request carried, for the span and log line

With both flags off the middleware is not installed and `request_trace` returns NO_TRACE, whose methods do
nothing (a dict lookup and a call per stage). With --log-requests only, a record keeps the request's numbers
for its log line and no span is made. The OpenTelemetry SDK and exporter are imported only when
--otlp-traces-endpoint is given, so the base install does not need them.

A request's span is SERVER kind, named "POST /v1/embeddings", a child of the W3C `traceparent` the client
sent when there is one. Its children: tokenize (the tokenizer pool's parse, validation and tokenization, its
wait for a pool thread included), queue (from admission until the engine thread starts the first batch that
holds the request's inputs), engine (from there until the engine has delivered the request's last row: its
batches, and the waits between them when its inputs span several) and render (normalization and
serialization). Attributes follow OpenTelemetry's HTTP and GenAI semantic conventions where they have a name.
"""

import asyncio
import logging
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from tp_embed.asgi import StatusSend

logger = logging.getLogger("tp_embed")

# the routes that get a span and a log line (health checks, metrics scrapes and /v1/models get neither)
API_ROUTES = frozenset(("/v1/embeddings", "/v1/rerank", "/rerank", "/v2/rerank", "/v1/score", "/score",
                        "/v1/classify", "/classify", "/tokenize", "/embed", "/", "/v2/embed", "/embed_sparse"))
SCOPE_KEY = "tp_embed.trace"
SERVICE_NAME = "tp-embed"
INSTALL_HINT = ('pip install "tp-embed[otel]" (or: pip install opentelemetry-sdk '
                'opentelemetry-exporter-otlp-proto-http)')
FLUSH_TIMEOUT = 5.0  # seconds to export the last spans at shutdown


class TracingError(RuntimeError):
    """--otlp-traces-endpoint cannot work: the SDK is not installed, or the URL is not an HTTP one."""


class _NoStage:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


NO_STAGE = _NoStage()


class _NoTrace:
    """The record of a request nobody traces or logs: every method does nothing."""
    __slots__ = ()

    def stage(self, name: str) -> _NoStage:
        return NO_STAGE

    def queued(self, submitted: int, started: int | None) -> None:
        pass

    def note(self, inputs: int, tokens: int) -> None:
        pass

    def fail(self, code: str) -> None:
        pass


NO_TRACE = _NoTrace()


def request_trace(request):
    """The record of a Starlette request (NO_TRACE when neither tracing nor the request log is on)."""
    return request.scope.get(SCOPE_KEY, NO_TRACE)


class _Stage:
    __slots__ = ("trace", "name", "span")

    def __init__(self, trace: "RequestTrace", name: str):
        self.trace, self.name, self.span = trace, name, None

    def __enter__(self):
        self.span = self.trace.tracer.start_span(self.name, context=self.trace.context)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
        self.span.end()


class RequestTrace:
    """One API request: its numbers for the log line, and its span when tracing is on."""
    __slots__ = ("tracer", "span", "context", "inputs", "tokens", "error_code")

    def __init__(self, tracer=None, span=None, context=None):
        self.tracer, self.span, self.context = tracer, span, context
        self.inputs: int | None = None
        self.tokens: int | None = None
        self.error_code: str | None = None

    def stage(self, name: str):
        """A context manager: a child span over the block (nothing when tracing is off)."""
        return NO_STAGE if self.span is None else _Stage(self, name)

    def queued(self, submitted: int, started: int | None) -> None:
        """Child spans, when the engine has answered (or the wait ended): queue from `submitted` (admission)
        to `started` (the engine thread's start of the request's first batch), engine from there to now.
        Times are time.time_ns(); started is None when no batch held the request (queue only)."""
        if self.span is None:
            return
        now = time.time_ns()
        end = now if started is None else min(max(started, submitted), now)
        self.tracer.start_span("queue", context=self.context, start_time=submitted).end(end_time=end)
        if started is not None:
            self.tracer.start_span("engine", context=self.context, start_time=end).end(end_time=now)

    def note(self, inputs: int, tokens: int) -> None:
        self.inputs, self.tokens = inputs, tokens

    def fail(self, code: str) -> None:
        self.error_code = code


class Tracing:
    """The server's tracing settings: an OpenTelemetry tracer (or None) and whether to log requests."""

    def __init__(self, tracer=None, provider=None, log_requests: bool = False):
        self.tracer, self.provider, self.log_requests = tracer, provider, log_requests
        if tracer is not None:  # what each request needs, imported once
            from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
            self.propagator = TraceContextTextMapPropagator()
            self.server_kind, self.set_span_in_context = SpanKind.SERVER, set_span_in_context
            self.error_status = lambda description: Status(StatusCode.ERROR, description)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None or self.log_requests

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()

    def shutdown(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Export the spans still queued and stop the exporter's thread, waiting at most `timeout` seconds (an
        unreachable collector must not hold the exit up)."""
        if self.provider is None:
            return
        provider, self.provider = self.provider, None
        thread = threading.Thread(target=provider.shutdown, name="tp-embed-trace-flush", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("tracing: the last spans were not exported within %.0f s", timeout)


OFF = Tracing()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: the endpoint as given, or with /v1/traces when it has no path."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TracingError(f"--otlp-traces-endpoint {endpoint}: tp-embed exports OTLP over HTTP; give the "
                           f"collector's http:// or https:// URL, e.g. http://localhost:4318/v1/traces")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1/traces")
    return urlunsplit(parts)


def start_tracing(endpoint: str | None, log_requests: bool = False, exporter=None) -> Tracing:
    """Tracing as the flags ask. `exporter` replaces the OTLP exporter (tests pass the SDK's
    InMemorySpanExporter); spans go through a BatchSpanProcessor either way. Raises TracingError."""
    if endpoint is None and exporter is None:
        return Tracing(log_requests=log_requests)
    url = traces_url(endpoint) if endpoint is not None else None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=url)
    except ImportError as e:
        raise TracingError(f"--otlp-traces-endpoint needs the OpenTelemetry SDK and its OTLP/HTTP exporter, "
                           f"which are not installed ({e}): {INSTALL_HINT}") from None
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, as the SDK reads them
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    # no atexit hook: the server shuts the provider down itself, with a bound on the time it takes
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    from tp_embed import __version__
    if url is not None:
        logger.info("tracing: spans to %s (OTLP/HTTP) as service %s", url, resource.attributes.get("service.name"))
    return Tracing(provider.get_tracer("tp_embed", __version__), provider, log_requests)


class RequestTraceMiddleware:
    """Plain ASGI: a RequestTrace for each request to an API route, its span ended and its log line written
    once the response (an error response too) is sent. `model()` names the served model (None while loading)."""

    def __init__(self, app, tracing: Tracing, model=lambda: None):
        self.app, self.tracing, self.model = app, tracing, model

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if scope["type"] != "http" or path not in API_ROUTES:
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        trace = scope[SCOPE_KEY] = self._start(scope)
        send = StatusSend(send)
        try:
            await self.app(scope, receive, send)
        except Exception as e:  # ServerErrorMiddleware, outside this one, answers 500 and re-raises
            send.status, trace.error_code = 500, "internal_error"
            if trace.span is not None:
                trace.span.record_exception(e)
            raise
        except asyncio.CancelledError:  # the server stopped the request: no response
            trace.error_code = "cancelled"
            raise
        finally:
            self._finish(scope, trace, send.status, (time.perf_counter() - start) * 1000)

    def _start(self, scope) -> RequestTrace:
        tracer = self.tracing.tracer
        if tracer is None:
            return RequestTrace()
        tracing = self.tracing
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"traceparent", b"tracestate")}
        parent = tracing.propagator.extract(carrier) if carrier else None
        method = scope["method"]
        attributes = {"http.request.method": method, "http.route": scope["path"], "url.path": scope["path"],
                      "url.scheme": scope.get("scheme", "http")}
        model = self.model()
        if model is not None:
            attributes["gen_ai.request.model"] = model
        span = tracer.start_span(f"{method} {scope['path']}", context=parent, kind=tracing.server_kind,
                                 attributes=attributes)
        if not span.is_recording():  # not sampled (OTEL_TRACES_SAMPLER): no stage spans either
            return RequestTrace()
        return RequestTrace(tracer, span, tracing.set_span_in_context(span))

    def _finish(self, scope, trace: RequestTrace, status: int, ms: float) -> None:
        if status >= 400 and trace.error_code is None and status != 499:
            trace.error_code = str(status)
        span = trace.span
        if span is not None:
            attributes = {"http.response.status_code": status}
            if trace.inputs is not None:
                attributes["tp_embed.request.inputs"] = trace.inputs
                attributes["gen_ai.usage.input_tokens"] = trace.tokens
            if trace.error_code is not None:
                attributes["error.type"] = trace.error_code
            span.set_attributes(attributes)
            if status >= 500:  # HTTP server spans: a 4xx is the client's error, not the server's
                span.set_status(self.tracing.error_status(trace.error_code))
            span.end()
        if self.tracing.log_requests:
            count = "-" if trace.inputs is None else trace.inputs
            tokens = "-" if trace.tokens is None else trace.tokens
            error = "" if trace.error_code is None else f" error={trace.error_code}"
            logger.info("%s %s %d inputs=%s tokens=%s ms=%.1f%s", scope["method"], scope["path"], status, count,
                        tokens, ms, error)
