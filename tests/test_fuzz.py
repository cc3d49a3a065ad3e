"""Fuzzing POST /v1/embeddings of one live server (tp=2, gloo, CPU, the tiny random Mistral) with 2,000
hypothesis cases: random bytes, broken JSON, JSON of every type at every field, odd unicode (NUL, RTL
marks, lone surrogates escaped as "\\ud800"), huge and negative numbers, nested lists, long strings,
content types and API keys.

Every case must get a response (no connection error), never a 5xx; every error has OpenAI's shape
{"error": {"message", "type", "param", "code"}}; every 200 has one vector per input, of the asked
dimensions, finite and unit-length (unless `normalize` is false). Where the answer is predictable (a
field of the wrong type, a bad `dimensions`, a token id out of range, a text over the context length
counted by the model's own tokenizer) the status and the error's `param` are checked too. Afterwards
the server must still answer a good request like sentence-transformers does.

The seed is fixed (derandomize), so a failure reproduces; hypothesis prints the shrunk body.
"""

import base64
import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from server_utils import ServerProcess, cosine_rows, response_vectors
from tiny_models import MIXED_TEXTS, st_encode

API_KEY = "sk-fuzz-0123456789"
NAME = "tiny-mistral"
DIMS = (16, 32, 64)  # declared with --json-model-override-args; hidden size 64
HIDDEN = 64
VOCAB = 1003
CONTEXT = 256
MAX_INPUT_TOKENS = 32768  # the server's --max-input-tokens default
MAX_BYTES = 1_000_000  # small, so that long strings also meet the 413
FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "normalize", "truncate", "prompt_name",
          "instruction")
ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large"}


def fuzz(max_examples: int):
    """The same settings for every fuzz case: fixed seed, no example database, no time limit."""
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def server(tiny_mistral_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "fuzz.log"
    args = ["--model-path", tiny_mistral_dir, "--tp", "2", "--served-model-name", NAME,
            "--json-model-override-args", json.dumps({"matryoshka_dimensions": list(DIMS)}),
            "--max-request-bytes", str(MAX_BYTES)]
    with ServerProcess(args, nproc=2, log_path=log, api_key=API_KEY) as s:
        s.model_dir = tiny_mistral_dir
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_mistral_dir):
    return AutoTokenizer.from_pretrained(tiny_mistral_dir)


# ---- strategies ----

ODD_CHARS = ["\x00", "\x7f", "\u200e", "\u200f", "\u202e", "\u2066", "\u2028", "\ufeff", "\ufffd", "\uffff",
             "\u0301", "\U0001f600", "\U0010ffff", "\ud800", "\udbff", "\udc00", "\udfff", '"', "\\", "\n"]
# Every code point, surrogates included. Joined lists, not st.text, which drops surrogates whatever
# the alphabet says.
chars = st.characters(exclude_categories=()) | st.sampled_from(ODD_CHARS)
odd_text = st.text(max_size=30) | st.lists(chars, max_size=30).map("".join)
# up to 300,000 characters, built by repetition (hypothesis draws at most a few KB per example)
long_text = st.builds(lambda piece, n: (piece * n)[:n], st.lists(chars, min_size=1, max_size=6).map("".join),
                      st.integers(1, 300_000))
big_ints = st.sampled_from([2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 100, -10 ** 100, 10 ** 4000])
json_scalars = st.none() | st.booleans() | st.integers() | big_ints | st.floats() | odd_text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(odd_text, inner, max_size=4), max_leaves=12)
token_ids = st.integers(-3, VOCAB + 3) | st.integers(0, VOCAB - 1) | big_ints | st.booleans() | st.floats()
nested = st.integers(1, 3000).map(lambda depth: "[" * depth + "1" + "]" * depth)  # JSON text


def encode(obj, how: str = "ascii") -> bytes:
    """A JSON body in one of the encodings json.loads detects; "surrogatepass" writes lone surrogates as
    (invalid) UTF-8 bytes instead of \\u escapes, which json.loads reads back as surrogates."""
    if how == "ascii":
        return json.dumps(obj).encode()
    text = json.dumps(obj, ensure_ascii=False)
    if how == "surrogatepass":
        return text.encode("utf-8", "surrogatepass")
    return text.encode(how, "surrogatepass")  # utf-16 / utf-32 with a BOM


encodings = st.sampled_from(["ascii", "ascii", "ascii", "surrogatepass", "utf-16", "utf-32"])


# ---- checks every response passes ----

def check(response: httpx.Response, body: bytes) -> None:
    """No 5xx; the OpenAI error shape; a 200 holds one good vector per input of the body the server read."""
    status = response.status_code
    assert status in (200, 400, 401, 404, 413), f"{status} for {body[:300]!r}: {response.text[:500]}"
    if status != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert error["type"] == "invalid_request_error", error
        assert error["param"] is None or isinstance(error["param"], str), error
        assert error["code"] == ERROR_CODES.get(status, error["code"]), error
        assert error["code"] is None or isinstance(error["code"], str), error
        return
    request = json.loads(body)  # as the server read it
    raw = request["input"]
    count = 1 if isinstance(raw, str) or type(raw[0]) is int else len(raw)
    out = response.json()
    vectors = response_vectors(out)
    assert vectors.shape == (count, request.get("dimensions") or HIDDEN)
    assert np.isfinite(vectors).all()
    if request.get("normalize") is not False:  # the tiny model's sentence-transformers files normalize
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    kind = str if request.get("encoding_format") == "base64" else list
    assert all(isinstance(d["embedding"], kind) for d in out["data"])
    assert out["model"] == NAME and out["usage"]["prompt_tokens"] >= count


def post(client, body: bytes, headers: dict | None = None) -> httpx.Response:
    response = client.post("/v1/embeddings", content=body,
                           headers={"Content-Type": "application/json", **(headers or {})})
    check(response, body)
    return response


def assert_error(response: httpx.Response, status: int, params) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.json()["error"]["param"] in params, response.text[:500]


def run(case, calls: list, examples: int) -> None:
    """Run a hypothesis case and check it ran `examples` times (a strategy too narrow would run fewer)."""
    fuzz(examples)(case)()
    assert len(calls) == examples


# ---- the fuzz cases: 250 + 250 + 200 + 400 + 500 + 250 + 150 = 2,000 ----

def test_random_bytes(client):
    prefixes = st.sampled_from([b"", b"{", b"[", b'"', b'{"input":', b'{"input": "a", ', b"\xef\xbb\xbf{"])

    calls = []

    @given(st.builds(bytes.__add__, prefixes, st.binary(max_size=2048)))
    def case(body):
        calls.append(1)
        post(client, body)

    run(case, calls, 250)


VALID_BODIES = [{"input": "hello"}, {"input": ["a b", "c"], "model": NAME, "encoding_format": "base64"},
                {"input": [[1, 2, 3], [4]], "dimensions": 32}, {"input": [5, 6], "normalize": False}]
BROKEN_JSON = [b"", b" ", b"null", b"true", b"0", b'"input"', b"{}", b'{"input": "a",}', b"{'input': 'a'}",
               b'{"input": "a" /* c */}', b'{"input": "a", "input": ""}', b'{"input": NaN}',
               b'{"input": [Infinity]}', b'{"input": "a", "dimensions": -Infinity}',
               b'{"input": [' + b"9" * 5000 + b"]}", b'{"input": "a", "dimensions": ' + b"1" * 4000 + b"}",
               b'{"input": "\\ud800"}', b'{"input": "\\u00"}', b'{"input": "\x00"}', b'{"input": "a"}\x00',
               b'{"input": "a"} {"input": "b"}', b'\xff\xfe{\x00}\x00']


def test_broken_and_deeply_nested_json(client):
    def mutate(body: bytes, position: int, new: bytes, kind: str) -> bytes:
        i = position % (len(body) + 1)
        return {"cut": body[:i], "delete": body[:i] + body[i + 1:], "insert": body[:i] + new + body[i:],
                "replace": body[:i] + new + body[i + 1:]}[kind]

    mutated = st.builds(mutate, st.sampled_from([json.dumps(b).encode() for b in VALID_BODIES]),
                        st.integers(0, 200), st.binary(min_size=1, max_size=3),
                        st.sampled_from(["cut", "delete", "insert", "replace"]))
    # deep values written as text: json.dumps itself gives up near 1,000 levels
    deep = st.builds(lambda field, text: (text if field is None else f'{{"input": "a", "{field}": {text}}}').encode(),
                     st.sampled_from([None, *FIELDS, "unknown"]), nested)
    unclosed = st.integers(1, 100_000).map(lambda depth: b'{"input": ' + b"[" * depth)

    calls = []

    @given(mutated | st.sampled_from(BROKEN_JSON) | deep | unclosed)
    def case(body):
        calls.append(1)
        post(client, body)

    run(case, calls, 250)


def test_arbitrary_json_documents(client):
    field_names = st.sampled_from(FIELDS) | odd_text
    documents = json_values | st.dictionaries(field_names, json_values, max_size=6)

    calls = []

    @given(documents, encodings)
    def case(document, how):
        calls.append(1)
        post(client, encode(document, how))

    run(case, calls, 200)


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def type_ok(field: str, value) -> bool:
    """Whether the schema accepts the value's JSON type (bool is not an integer; null means omitted)."""
    if value is None:
        return field not in ("input", "encoding_format")
    kinds = {"model": str, "encoding_format": str, "user": str, "prompt_name": str, "instruction": str,
             "dimensions": int, "normalize": bool, "truncate": bool}
    return field == "input" or type(value) is kinds[field]


def test_every_field_with_every_json_type(client):
    base = {"input": "hello there", "model": NAME, "encoding_format": "float", "dimensions": 32, "user": "u",
            "normalize": True, "truncate": False}

    calls = []

    @given(st.sampled_from(FIELDS), json_values, st.booleans(), odd_text)
    def case(field, value, unknown, unknown_name):
        calls.append(1)
        body = dict(base, **{field: value})
        if unknown and unknown_name not in FIELDS:
            body[unknown_name] = value
            response = post(client, encode(body))
            # a name UTF-8 cannot carry may go unnamed, but not be called 'None'
            unnamed = [] if utf8(unknown_name) else [None]
            # a high and a low surrogate side by side come back as the one character their \u escapes make
            as_read = json.loads(json.dumps(unknown_name))
            assert_error(response, 400, [unknown_name or None, as_read or None, field, *unnamed])
            assert not response.json()["error"]["message"].startswith("invalid value for 'None'"), response.text
            return
        response = post(client, encode(body))
        if not type_ok(field, value):
            assert_error(response, 400, [field])

    run(case, calls, 400)


def expected_input_status(raw, truncate: bool, tokenizer) -> int | None:
    """200 or 400 from the input alone (the rest of the body is valid), counting tokens with the model's
    own tokenizer; None where either is right (text with lone surrogates, which UTF-8 cannot carry)."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, (str, list)) or not items:
        return 400
    if isinstance(items[0], dict):  # {"text", "image"} items: a text-only model takes those with text only
        if len(items) > 2048 or not all(isinstance(i, dict) and i and set(i) == {"text"} for i in items):
            return 400
        items = [i["text"] for i in items]
        if not all(isinstance(t, str) for t in items):
            return 400
    if all(isinstance(t, str) for t in items):
        if len(items) > 2048 or not all(items):
            return 400
        if not all(map(utf8, items)):
            return None
        lengths = [len(ids) for ids in tokenizer(items)["input_ids"]]
        return fits(max(lengths), truncate)
    sequences = [raw] if type(raw[0]) is int else raw
    if len(sequences) > 2048 or not all(isinstance(s, list) and s for s in sequences):
        return 400
    if not all(type(t) is int and 0 <= t < VOCAB for s in sequences for t in s):
        return 400
    return fits(max(map(len, sequences)), truncate)


def fits(num_tokens: int, truncate: bool) -> int:
    """An input's status by its tokens: over --max-input-tokens is refused even with truncation."""
    return 200 if num_tokens <= CONTEXT or (truncate and num_tokens <= MAX_INPUT_TOKENS) else 400


def test_inputs(client, tokenizer):
    ids = st.lists(token_ids, min_size=0, max_size=300)
    good_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=300)
    inputs = st.one_of(
        odd_text, long_text, st.lists(odd_text, max_size=8), st.lists(long_text, min_size=1, max_size=2),
        ids, good_ids, st.lists(ids, max_size=4), st.lists(good_ids, min_size=1, max_size=4),
        st.lists(json_values, max_size=5), json_values, st.sampled_from(["", [], [""], [[]], ["a", ""], [[1], []]]),
        st.lists(st.dictionaries(st.sampled_from(["text", "image", "x"]), json_values | odd_text, max_size=2),
                 min_size=1, max_size=3),
        st.integers(2040, 2060).map(lambda n: ["a"] * n), st.integers(2040, 2060).map(lambda n: [[7]] * n))

    calls = []

    @given(inputs, st.sampled_from([None, True, False]), encodings)
    def case(raw, truncate, how):
        calls.append(1)
        body = {"input": raw} if truncate is None else {"input": raw, "truncate": truncate}
        data = encode(body, how)
        response = post(client, data)
        if len(data) > MAX_BYTES:
            assert response.status_code == 413
            return
        expected = expected_input_status(raw, bool(truncate), tokenizer)
        if expected is not None:
            assert response.status_code == expected, (raw if len(data) < 2000 else data[:300], response.text[:500])
        if expected == 400:
            assert response.json()["error"]["param"] == "input"

    run(case, calls, 500)


def test_dimensions_and_encoding_format(client):
    dimensions = (st.integers() | big_ints | st.sampled_from([0, -1, *DIMS, HIDDEN + 1]) | st.booleans()
                  | st.floats() | st.sampled_from(["32", 32.0, [32], None]))
    formats = (st.sampled_from(["float", "base64", "FLOAT", "Base64", "base64 ", " float", "int8", "binary", "",
                                "float\x00", "base64\u200f", None, 0, True, ["float"]]) | odd_text)
    omit = object()

    calls = []

    @given(dimensions | st.just(omit), formats | st.just(omit), st.sampled_from(["one", ["a", "b", "c"]]))
    def case(dims, fmt, raw):
        calls.append(1)
        body = {"input": raw}
        if dims is not omit:
            body["dimensions"] = dims
        if fmt is not omit:
            body["encoding_format"] = fmt
        response = post(client, encode(body))
        dims_ok = dims is omit or dims is None or (type(dims) is int and dims in DIMS)
        fmt_ok = fmt is omit or fmt in ("float", "base64")
        if fmt is None:
            return  # JSON null for encoding_format: refusing it and reading it as the default are both fine
        if dims_ok and fmt_ok:
            assert response.status_code == 200, response.text[:500]
        elif dims_ok or fmt_ok:
            assert_error(response, 400, ["encoding_format" if dims_ok else "dimensions"])
        else:
            assert_error(response, 400, ["encoding_format", "dimensions"])

    run(case, calls, 250)


def authorized(header: str | None) -> bool:
    if header is None:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and token.strip() == API_KEY


def test_content_types_and_api_keys(client):
    content_types = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                                     "application/octet-stream", "", "x/y"])
    printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
    # HTTP strips the spaces around a header value, so none are sent
    keys = (st.sampled_from([f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER  {API_KEY}", f"Basic {API_KEY}",
                             "Bearer", "", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}", API_KEY, None])
            | printable.map(str.strip) | printable.map(lambda t: ("Bearer " + t).strip()))
    bodies = st.sampled_from([(encode({"input": "hello"}), 200), (encode({"input": ["a", "b"]}, "utf-16"), 200),
                              (b"input=hello", 400),
                              (b"--x\r\ncontent-disposition: form-data\r\n\r\nhi\r\n--x--", 400)])

    calls = []

    @given(content_types, keys, bodies, st.booleans())
    def case(content_type, key, body_and_status, gzip_header):
        calls.append(1)
        body, status = body_and_status
        headers = {"Authorization": key} if key is not None else {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if gzip_header:
            headers["Content-Encoding"] = "gzip"  # a claim the body does not keep: read as it is
        request = client.build_request("POST", "/v1/embeddings", content=body, headers=headers)
        if key is None:
            del request.headers["Authorization"]  # the client's default key
        if content_type is None:
            request.headers.pop("Content-Type", None)
        response = client.send(request)
        check(response, body)
        # the body is read as JSON whatever Content-Type says
        assert response.status_code == (status if authorized(key) else 401), response.text[:300]

    run(case, calls, 150)


# Bodies the cases above found, as hypothesis shrank them (and their neighbours). The first four were
# answered with a 500 (TypeError from the tokenizer, RecursionError from json.loads), after which uvicorn
# closed the keep-alive connection; the last with "invalid value for 'None'" and no param.
FOUND = [
    ("lone surrogate in a text", b'{"input": "\\ud800"}', ["input"]),
    ("lone surrogate in a list of texts", b'{"input": ["a", "b\\udfffc"], "truncate": true}', ["input"]),
    ("JSON nested 1000 deep", b'{"input": ' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}", [None]),
    ("unclosed JSON nested 989 deep", b'{"input": ' + b"[" * 989, [None]),
    ("lone surrogate in a field name", b'{"input": "a", "\\ud800": 1}', ["\ud800", None]),
]


@pytest.mark.parametrize("body, params", [case[1:] for case in FOUND], ids=[case[0] for case in FOUND])
def test_bodies_found_by_fuzzing(client, body, params):
    response = post(client, body)
    assert_error(response, 400, params)
    assert not response.json()["error"]["message"].startswith("invalid value for 'None'"), response.text[:300]


# ---- afterwards ----

def test_the_server_still_answers_correctly(server, client):
    texts = MIXED_TEXTS[:8]
    r = client.post("/v1/embeddings", json={"input": texts, "model": NAME})
    assert r.status_code == 200, r.text
    assert cosine_rows(response_vectors(r.json()), st_encode(server.model_dir, texts)).min() >= 0.99999
    r = client.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64", "dimensions": 16})
    vector = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (16,)
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.proc.poll() is None
    assert server.metric("tp_embed_requests_total", 'route="/v1/embeddings",status="500"') == 0
    assert "unexpected error" not in server.log()
