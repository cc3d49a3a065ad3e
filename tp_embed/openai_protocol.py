"""The OpenAI embeddings API on the wire: request schemas, input validation, errors and responses.

Everything here runs on rank 0 before a request is admitted, so a client mistake is answered with a 400
and never reaches the engine thread or a worker.
"""

import base64
import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

MAX_INPUTS = 2048  # OpenAI's limit on the items of one request

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> bytes:
        error = {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                 "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


def request_prompt(text, name: str | None) -> str:
    """The prompt a request's `prompt_name` names (the model's default for None) from TextProcessor `text`; an
    unknown name is a 400 on prompt_name."""
    try:
        return text.prompt(name)
    except KeyError as e:
        raise APIError(400, e.args[0], param="prompt_name") from None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. `normalize`, `truncate`, `long_inputs`, `output` and `prompt_name` are tp-embed extensions;
    `truncate_prompt_tokens` and `truncation_side` are vLLM's."""
    model_config = ConfigDict(extra="forbid")

    input: object  # str | list[str] | list[int] | list[list[int]], checked by parse_input
    model: StrictStr | None = None  # OpenAI requires it; omitted means the served model
    encoding_format: StrictStr = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    normalize: StrictBool | None = None
    truncate: StrictBool | None = None
    truncate_prompt_tokens: StrictInt | None = None  # vLLM's: keep at most N tokens (-1: the context length)
    truncation_side: Literal["right", "left"] | None = None  # right keeps the beginning
    long_inputs: Literal["error", "truncate", "chunk"] | None = None  # overrides --long-inputs
    # dense (the default), or a sparse model's / bge-m3's sparse vector, or bge-m3's ColBERT vectors
    output: Literal["dense", "sparse", "colbert"] | None = None
    prompt_name: StrictStr | None = None
    instruction: StrictStr | None = None  # GME's system instruction for this request's items


class TokenizeRequest(BaseModel):
    """POST /tokenize, as SGLang defines it."""
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    add_special_tokens: StrictBool = True


def parse_json_body(body: bytes, schema: type[BaseModel]) -> BaseModel:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}",
                       code="invalid_json")
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if param is None:
            raise APIError(400, f"invalid request body: {err['msg']}") from None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {param}", param=param) from None
        if err["type"] == "missing":
            raise APIError(400, f"'{param}' is a required property", param=param) from None
        got = json.dumps(err.get("input"))[:80]
        raise APIError(400, f"invalid value for '{param}': {err['msg']} (got {got})", param=param) from None


def check_encoding_format(encoding_format: str) -> None:
    if encoding_format not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be 'float' or 'base64', got {encoding_format!r}",
                       param="encoding_format")


def json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    kinds = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "an object",
             list: "a list", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def check_num_inputs(raw: list, param: str = "input") -> None:
    if len(raw) > MAX_INPUTS:
        raise APIError(400, f"{param} has {len(raw)} items; at most {MAX_INPUTS} are allowed per request",
                       param=param)


def parse_input(raw: object) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token-id lists) from the four shapes OpenAI accepts."""
    shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(raw, str):
        if not raw:
            raise APIError(400, "input must not be an empty string", param="input")
        check_text(raw, "input")
        return [raw], None
    if not isinstance(raw, list):
        raise APIError(400, f"input must be {shapes}, got {json_kind(raw)}", param="input")
    if not raw:
        raise APIError(400, "input must not be an empty list", param="input")
    first = raw[0]
    if isinstance(first, str):
        check_num_inputs(raw)
        for i, text in enumerate(raw):
            if not isinstance(text, str):
                raise APIError(400, f"input[{i}] is {json_kind(text)}, but input[0] is a string: "
                                    f"a list of inputs holds strings only", param="input")
            if not text:
                raise APIError(400, f"input[{i}] is an empty string", param="input")
            check_text(text, f"input[{i}]")
        return raw, None
    if isinstance(first, list):
        check_num_inputs(raw)
        for i, ids in enumerate(raw):
            if not isinstance(ids, list):
                raise APIError(400, f"input[{i}] is {json_kind(ids)}, but input[0] is a list of token "
                                    f"ids: a list of token-id lists holds lists only", param="input")
            if not ids:
                raise APIError(400, f"input[{i}] is an empty list of token ids", param="input")
        return None, raw
    if type(first) is int:
        return None, [raw]
    raise APIError(400, f"input must be {shapes}; input[0] is {json_kind(first)}", param="input")


def parse_items(raw: object) -> list[tuple[str | None, str | None]] | None:
    """Multimodal input, as SGLang accepts it: a list of {"text": ...}, {"image": ...} or both, one
    embedding per item. Returns (text, image reference) per item, or None when `raw` is another shape."""
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], dict):
        return None
    check_num_inputs(raw)
    items = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise APIError(400, f"input[{i}] is {json_kind(item)}, but input[0] is an object: a list of "
                                f"items holds objects with 'text' and/or 'image'", param="input")
        unknown = sorted(set(item) - {"text", "image"})
        if unknown:
            raise APIError(400, f"input[{i}] has unknown fields {unknown}; an item holds 'text' and/or 'image'",
                           param="input")
        for key in ("text", "image"):
            value = item.get(key)
            if key in item and (not isinstance(value, str) or not value):
                raise APIError(400, f"input[{i}].{key} must be a non-empty string", param="input")
            if key in item:
                check_text(value, f"input[{i}].{key}")
        if not item:
            raise APIError(400, f"input[{i}] is an empty object; an item needs 'text', 'image' or both",
                           param="input")
        items.append((item.get("text"), item.get("image")))
    return items


def check_text(text: str, where: str, param: str = "input") -> None:
    """JSON can spell a lone UTF-16 surrogate (\\ud800), which is no text a tokenizer takes."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where} holds a lone UTF-16 surrogate (\\ud800 to \\udfff without its pair), "
                                f"which is not valid Unicode text", param=param) from None


def check_token_ids(sequences: list[list[int]], vocab_size: int, nested: bool) -> None:
    """Every id an int in [0, vocab_size); names the first bad one."""
    for i, ids in enumerate(sequences):
        # fast path: one C-level pass for the types, then min/max
        if all(type(t) is int for t in ids) and min(ids) >= 0 and max(ids) < vocab_size:
            continue
        for j, t in enumerate(ids):
            where = f"input[{i}][{j}]" if nested else f"input[{j}]"
            if type(t) is not int:
                raise APIError(400, f"{where} = {json.dumps(t)[:40]} is not a token id: token ids are integers "
                                    f"from 0 to {vocab_size - 1}", param="input")
            if not 0 <= t < vocab_size:
                raise APIError(400, f"{where} = {t} is not a token id of this model: token ids are integers "
                                    f"from 0 to {vocab_size - 1}", param="input")


def non_finite_error() -> APIError:
    return APIError(500, "the model produced non-finite values (overflow in a reduced-precision dtype?); "
                         "try --dtype float32", code="non_finite_output")


def render_embeddings(vectors: np.ndarray, encoding_format: str, model: str, num_tokens: int) -> bytes:
    """The response body: row i of float32 [n, d] `vectors` is data[i].

    float: each number in its shortest float32 form (numpy's vectorized str cast, half the bytes of
    float64 reprs); base64: the little-endian float32 bytes of each row, as OpenAI sends them.
    """
    if not np.isfinite(vectors).all():
        raise non_finite_error()
    if encoding_format == "base64":
        rows = [b'"' + base64.b64encode(row.tobytes()) + b'"' for row in vectors.astype("<f4", copy=False)]
    else:
        # the str cast takes 128 bytes per number: convert blocks of ~64k numbers, not 2048 x 4096 at once
        rows = []
        step = max(1, 65536 // max(1, vectors.shape[1]))
        for start in range(0, vectors.shape[0], step):
            rows += [("[" + ",".join(row) + "]").encode() for row in vectors[start:start + step].astype(str).tolist()]
    data = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, row) for i, row in enumerate(rows))
    tail = json.dumps({"model": model, "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}},
                      separators=(",", ":"))
    return b'{"object":"list","data":[' + data + b"]," + tail[1:].encode()


def render_outputs(results: list, output: str, encoding_format: str, model: str, num_tokens: int) -> bytes:
    """The response body for `output` sparse or colbert (a tp-embed extension), data[i] from results[i]:

    sparse: (indices, values) -> "embedding": {"indices": [ascending ints], "values": [floats]};
    colbert: float32 [tokens, dim] -> "embedding": [[floats], ...] one vector per token, or with base64 the
    little-endian float32 bytes of the matrix, row after row (a client reshapes them by the model's dim).
    """
    data = []
    for i, result in enumerate(results):
        if output == "sparse":
            indices, values = result
            embedding = {"indices": indices.tolist(), "values": values.tolist()}
        elif encoding_format == "base64":
            embedding = base64.b64encode(result.astype("<f4", copy=False).tobytes()).decode()
        else:
            embedding = result.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}},
                      separators=(",", ":")).encode()
