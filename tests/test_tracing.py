"""Request tracing (--otlp-traces-endpoint) and the request log (--log-requests): tp_embed/tracing.py.

Most tests run the real HTTP app in this process (httpx's ASGITransport against build_app, the engine thread
and the embedded all-MiniLM-L6-v2 on the CPU, no torchrun) with the SDK's InMemorySpanExporter behind the
BatchSpanProcessor; the last ones start the real server with the OTLP exporter pointed at a collector here.
"""

import asyncio
import gzip
import http.server
import logging
import re
import subprocess
import sys
import threading
import time
import types

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs opentelemetry-sdk (pip install 'tp-embed[otel]')")

import launch  # noqa: E402
from server_utils import REPO, ServerProcess  # noqa: E402
from tp_embed.args import parse_with_config  # noqa: E402
from tp_embed.tracing import (  # noqa: E402
    NO_TRACE,
    OFF,
    RequestTraceMiddleware,
    TracingError,
    request_trace,
    start_tracing,
    traces_url,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
STAGES = ["tokenize", "queue", "engine", "render"]
LOG_LINE = re.compile(r"(POST|GET) (\S+) (\d{3}) inputs=(\d+|-) tokens=(\d+|-) ms=\d+\.\d( error=\S+)?$")


class App:
    """The server's app in this process, its engine thread started; `call` runs requests on its event loop."""

    def __init__(self, flags: list[str], tracing):
        from tp_embed.metrics import Metrics
        from tp_embed.server import EmbeddingServer, build_app
        self.server = EmbeddingServer(parse_with_config(launch.build_parser(), flags), Metrics())
        self.server.tracing = tracing
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()
        self.server.loop, self.server.uvicorn = self.loop, types.SimpleNamespace(should_exit=False)
        self.server.scheduler.start()
        deadline = time.monotonic() + 180
        while self.server.state == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.state == "ready", self.server.state
        self.app = build_app(self.server)

    def call(self, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                return [await client.request(method, path, **kw) for method, path, kw in requests]
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(120)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.call([("POST", path, kw)])[0]

    def close(self) -> None:
        self.server.scheduler.stop()
        assert self.server.scheduler.join(30)
        self.server.pool.shutdown(wait=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.server.tracing.shutdown()


@pytest.fixture(scope="module")
def traced():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()
    app = App(["--tokenizer-workers", "1"], start_tracing(None, log_requests=True, exporter=exporter))

    def spans():
        """The spans ended since the last call, by trace: {trace_id: [spans]}."""
        app.server.tracing.flush()
        by_trace = {}
        for s in exporter.get_finished_spans():
            by_trace.setdefault(s.context.trace_id, []).append(s)
        exporter.clear()
        return by_trace

    app.spans = spans
    yield app
    app.close()


def one_trace(app) -> tuple[object, dict[str, object]]:
    """The request span and its children by name, of the only trace exported since the last call."""
    traces = app.spans()
    assert len(traces) == 1, {t: [s.name for s in spans] for t, spans in traces.items()}
    [spans] = traces.values()
    roots = [s for s in spans if s.name.startswith(("POST ", "GET "))]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    children = {s.name: s for s in spans if s is not root}
    assert len(children) == len(spans) - 1, "two children of one name"
    for child in children.values():
        assert child.parent is not None and child.parent.span_id == root.context.span_id, child.name
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time, child.name
    return root, children


def test_embeddings_request_has_a_span_with_stage_children(traced):
    from opentelemetry.trace import SpanKind, StatusCode
    r = traced.post("/v1/embeddings", json={"input": ["hello there", "a second input"]})
    assert r.status_code == 200
    root, children = one_trace(traced)
    assert root.name == "POST /v1/embeddings" and root.kind == SpanKind.SERVER
    assert root.parent is None  # no traceparent was sent
    attrs = dict(root.attributes)
    assert attrs == {"http.request.method": "POST", "http.route": "/v1/embeddings", "url.path": "/v1/embeddings",
                     "url.scheme": "http", "http.response.status_code": 200, "tp_embed.request.inputs": 2,
                     "gen_ai.usage.input_tokens": r.json()["usage"]["prompt_tokens"],
                     "gen_ai.request.model": traced.server.served_model_name}
    assert root.status.status_code == StatusCode.UNSET
    assert sorted(children) == sorted(STAGES)
    tokenize, queue, engine, render = (children[n] for n in STAGES)
    # one after the other: queue ends where the engine thread started the batch, and the engine span runs on
    assert tokenize.end_time <= queue.start_time <= queue.end_time == engine.start_time
    assert engine.end_time <= render.start_time
    assert engine.end_time > engine.start_time  # a forward pass takes time


def test_rerank_request_has_a_span_with_stage_children(traced):
    r = traced.post("/v1/rerank", json={"query": "what is tp-embed?", "documents": ["an embedding server", "a fish"]})
    assert r.status_code == 200, r.text
    root, children = one_trace(traced)
    assert root.name == "POST /v1/rerank"
    assert sorted(children) == sorted(STAGES)
    assert root.attributes["http.route"] == "/v1/rerank" and root.attributes["http.response.status_code"] == 200
    assert root.attributes["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert root.attributes["tp_embed.request.inputs"] >= 2  # the documents (an embedder embeds the query too)


def test_a_400_has_its_status_and_error_code(traced, caplog):
    from opentelemetry.trace import StatusCode
    with caplog.at_level(logging.INFO, logger="tp_embed"):
        r = traced.post("/v1/embeddings", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    root, children = one_trace(traced)
    assert root.attributes["http.response.status_code"] == 400
    assert root.attributes["error.type"] == "invalid_json"
    assert "tp_embed.request.inputs" not in root.attributes  # nothing was parsed
    assert root.status.status_code == StatusCode.UNSET  # a 4xx is the client's error, not the server's
    assert list(children) == ["tokenize"] and children["tokenize"].attributes["error.type"] == "invalid_json"
    lines = [m.getMessage() for m in caplog.records if m.name == "tp_embed"]
    assert len(lines) == 1 and LOG_LINE.match(lines[0]), lines
    assert lines[0].startswith("POST /v1/embeddings 400 inputs=- tokens=- ms=")
    assert lines[0].endswith(" error=invalid_json")


def test_an_error_without_a_code_names_its_type(traced):
    r = traced.post("/v1/embeddings", json={"input": ""})
    assert r.status_code == 400 and r.json()["error"]["code"] is None
    root, _ = one_trace(traced)
    assert root.attributes["error.type"] == "invalid_request_error"


def test_a_traceparent_makes_the_span_its_child(traced):
    header = f"00-{TRACE_ID}-{PARENT_ID}-01"
    assert traced.post("/tokenize", json={"prompt": ["one", "two words"]},
                       headers={"traceparent": header}).status_code == 200
    root, children = one_trace(traced)
    assert root.name == "POST /tokenize" and sorted(children) == ["render", "tokenize"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_ID and root.parent.is_remote
    assert root.attributes["tp_embed.request.inputs"] == 2


def test_request_log_lines_and_no_spans_outside_the_api(traced, caplog):
    with caplog.at_level(logging.INFO, logger="tp_embed"):
        responses = traced.call([("POST", "/v1/embeddings", {"json": {"input": ["a b c"] * 3}}),
                                 ("GET", "/health", {}), ("GET", "/v1/models", {}), ("GET", "/metrics", {}),
                                 ("GET", "/v1/embeddings", {})])
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 405]
    tokens = responses[0].json()["usage"]["prompt_tokens"]
    lines = [m.getMessage() for m in caplog.records if m.name == "tp_embed"]
    assert len(lines) == 2, lines
    assert all(LOG_LINE.match(line) for line in lines), lines
    assert lines[0].startswith(f"POST /v1/embeddings 200 inputs=3 tokens={tokens} ms=") and "error" not in lines[0]
    assert lines[1].startswith("GET /v1/embeddings 405 inputs=- tokens=- ms=")
    assert lines[1].endswith(" error=invalid_request_error")
    names = sorted(s.name for spans in traced.spans().values() for s in spans if " " in s.name)
    assert names == ["GET /v1/embeddings", "POST /v1/embeddings"]


def test_an_unexpected_error_is_a_500_span_and_line(caplog):
    """The middleware alone, around an app that raises: Starlette's outermost middleware answers 500 and
    re-raises, so the middleware sees the exception, not the response."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode
    exporter = InMemorySpanExporter()
    tracing = start_tracing(None, log_requests=True, exporter=exporter)

    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    scope = {"type": "http", "method": "POST", "path": "/v1/score", "headers": [], "scheme": "http"}
    with caplog.at_level(logging.INFO, logger="tp_embed"), pytest.raises(RuntimeError):
        asyncio.run(RequestTraceMiddleware(broken, tracing)(scope, None, None))
    tracing.shutdown()
    [span] = exporter.get_finished_spans()
    assert span.name == "POST /v1/score" and span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 500 and span.attributes["error.type"] == "internal_error"
    assert [e.name for e in span.events] == ["exception"]
    [line] = [m.getMessage() for m in caplog.records if m.name == "tp_embed"]
    assert LOG_LINE.match(line) and line.startswith("POST /v1/score 500 ") and line.endswith(" error=internal_error")


def test_an_unsampled_request_makes_no_span_and_still_logs(monkeypatch, caplog):
    """OTEL_TRACES_SAMPLER (read by the SDK) can drop requests: those get no stage spans either."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    tracing = start_tracing(None, log_requests=True, exporter=exporter)
    stages = []

    async def handler(scope, receive, send):
        trace = request_trace(types.SimpleNamespace(scope=scope))
        with trace.stage("tokenize") as stage:
            stages.append(stage)
        trace.note(3, 12)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": [], "scheme": "http"}
    with caplog.at_level(logging.INFO, logger="tp_embed"):
        asyncio.run(RequestTraceMiddleware(handler, tracing)(scope, None, send))
    tracing.shutdown()
    assert exporter.get_finished_spans() == () and stages == [NO_TRACE.stage("x")]
    [line] = [m.getMessage() for m in caplog.records if m.name == "tp_embed"]
    assert line.startswith("POST /v1/embeddings 200 inputs=3 tokens=12 ms=")


def test_with_both_flags_off_nothing_is_installed():
    from tp_embed.metrics import Metrics
    from tp_embed.server import EmbeddingServer, build_app
    args = parse_with_config(launch.build_parser(), [])
    assert args.otlp_traces_endpoint is None and not args.log_requests
    assert not start_tracing(args.otlp_traces_endpoint, args.log_requests).enabled
    server = EmbeddingServer(args, Metrics())
    assert server.tracing is OFF and not OFF.enabled
    assert RequestTraceMiddleware not in [m.cls for m in build_app(server).user_middleware]
    request = types.SimpleNamespace(scope={})
    assert request_trace(request) is NO_TRACE
    with NO_TRACE.stage("tokenize"):  # the no-op record takes every call
        NO_TRACE.note(1, 2)
        NO_TRACE.queued(0, None)
        NO_TRACE.fail("x")


def test_log_requests_alone_makes_no_spans():
    tracing = start_tracing(None, log_requests=True)
    assert tracing.enabled and tracing.tracer is None and tracing.provider is None


def test_traces_url():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("https://collector:4318/") == "https://collector:4318/v1/traces"
    assert traces_url("http://c:4318/custom/traces") == "http://c:4318/custom/traces"
    for bad in ("grpc://localhost:4317", "localhost:4318", "http://"):
        with pytest.raises(TracingError, match="OTLP over HTTP"):
            traces_url(bad)


@pytest.mark.parametrize("env, name", [({}, "tp-embed"), ({"OTEL_SERVICE_NAME": "embedder-a"}, "embedder-a"),
                                       ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=b,x=y"}, "b")])
def test_service_name(env, name, monkeypatch):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    for key in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    tracing = start_tracing(None, exporter=InMemorySpanExporter())
    assert tracing.provider.resource.attributes["service.name"] == name
    tracing.shutdown()


def test_a_missing_sdk_is_a_clear_startup_error():
    """Exit 2 with the pip command, no traceback, before the model loads."""
    code = ("import sys\n"
            "sys.modules['opentelemetry.sdk'] = None  # as if opentelemetry-sdk were not installed\n"
            "import launch\n"
            "sys.exit(launch.main(['--otlp-traces-endpoint', 'http://127.0.0.1:9/v1/traces', '--port', '0', "
            "'--host-allocator', 'glibc']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert 'pip install "tp-embed[otel]"' in out and "opentelemetry-exporter-otlp-proto-http" in out
    assert "Traceback" not in out and "listening on" not in out


class Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps every POST: (path, content type, body)."""
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.received.append((self.path, self.headers.get("content-type"), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    Collector.received = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def exported_spans(received: list) -> tuple[set[str], list]:
    """(service names, spans) of the OTLP/HTTP protobuf exports a collector received on /v1/traces."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    services, spans = set(), []
    for path, content_type, body in received:
        assert path == "/v1/traces" and content_type == "application/x-protobuf", (path, content_type)
        export = ExportTraceServiceRequest.FromString(body)
        for rs in export.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            spans += [s for ss in rs.scope_spans for s in ss.spans]
    return services, spans


def test_the_server_exports_spans_to_a_collector_and_logs_requests(collector, minilm_dir, tmp_path):
    """tp 1 on the embedded model, --otlp-traces-endpoint without a path (/v1/traces is added): the spans
    arrive at the latest when the drain shuts the BatchSpanProcessor down, and the process still exits 0."""
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    server = ServerProcess(["--otlp-traces-endpoint", endpoint, "--log-requests"], nproc=1,
                           log_path=tmp_path / "server.log")
    with server:
        ok = server.post("/v1/embeddings", json={"input": ["hello", "world"]},
                         headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        bad = server.post("/v1/embeddings", json={"input": [1, "a"]})
        assert ok.status_code == 200 and bad.status_code == 400
    assert server.proc.returncode == 0, server.log()[-3000:]
    services, spans = exported_spans(Collector.received)
    assert services == {"tp-embed"}
    by_name = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    assert len(by_name["POST /v1/embeddings"]) == 2, sorted(by_name)
    traced = [s for s in by_name["POST /v1/embeddings"] if s.trace_id.hex() == TRACE_ID]
    assert len(traced) == 1 and traced[0].parent_span_id.hex() == PARENT_ID
    children = sorted(s.name for s in spans if s.parent_span_id == traced[0].span_id)
    assert children == sorted(STAGES)
    log = server.log()
    assert "tracing: spans to " + endpoint + "/v1/traces (OTLP/HTTP) as service tp-embed" in log
    tokens = ok.json()["usage"]["prompt_tokens"]
    assert re.search(rf"INFO POST /v1/embeddings 200 inputs=2 tokens={tokens} ms=\d+\.\d\n", log), log[-3000:]
    assert re.search(r"INFO POST /v1/embeddings 400 inputs=- tokens=- ms=\d+\.\d error=invalid_request_error\n", log)
    assert "GET /health" not in log  # the readiness polls are neither API requests nor uvicorn's access log
