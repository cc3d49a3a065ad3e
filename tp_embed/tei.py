"""text-embeddings-inference's embedding routes on the same engine, so its clients (huggingface_hub's
InferenceClient, LangChain's and LlamaIndex's TEI integrations) work unchanged:

- POST /embed: {"inputs": str | [str] (or token ids), "normalize" (default true), "truncate",
  "truncation_direction" ("Right" keeps the beginning, "Left" the end), "prompt_name", "dimensions"} -> [[float]];
  `truncate` unset follows --long-inputs (chunking included), as on /v1/embeddings. The fields
  may also come nested in "parameters", as huggingface_hub's InferenceClient sends them.
- POST /: TEI dispatches by the model's task; here an embedding model embeds, another says which routes it
  serves.
- GET /info: the model and the server's limits, in TEI's shape.
- POST /rerank with "texts" (the route serves the Cohere/Jina shape too, told apart by the body): {"query",
  "texts", "raw_scores", "return_text", "truncate", "truncation_direction"} -> [{"index", "score", "text"?}],
  highest score first; the scores are scoring.prepare_rerank's. "Left" is refused: a pair longer than the
  context loses the end of its text, never its query, whatever "truncate" says.
- POST /tokenize with "inputs" (beside SGLang's {"prompt"}): {"inputs": str | [str], "add_special_tokens",
  "prompt_name"} -> one list per input of {"id", "text", "special", "start", "stop"}: character offsets into
  the input with its prompt prepended, as TEI tokenizes it; special tokens have null offsets.
Errors on these routes take TEI's shape, {"error": message, "error_type": kind}, and its statuses: 422 for a
bad request (OpenAI's routes answer 400), 413 for one too large, 429 when the queue is full. On the shared
/rerank and /tokenize, an error before the body is read (401, 413, 503) keeps the other API's shape.
"""

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from tp_embed.openai_protocol import (
    APIError,
    EmbeddingRequest,
    check_num_inputs,
    check_text,
    parse_json_body,
    request_prompt,
)
from tp_embed.scoring import PreparedTask, ScoringModel, check_task, parse_documents, score_pairs
from tp_embed.text import TextProcessor

ROUTES = ("/embed", "/", "/info", "/rerank", "/tokenize")  # the last two shared with other APIs
ERROR_TYPES = {401: "Unauthorized", 413: "Validation", 422: "Validation", 429: "Overloaded", 499: "Cancelled",
               503: "Unhealthy"}


class TeiEmbedSparseRequest(BaseModel):
    """POST /embed_sparse; /embed's request (TeiEmbedRequest) is this one and its own fields."""
    model_config = ConfigDict(extra="forbid")

    inputs: object  # str | list[str] | list[int] | list[list[int]], checked as /v1/embeddings' input
    truncate: StrictBool | None = None
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    prompt_name: StrictStr | None = None
    parameters: dict | None = None  # huggingface_hub nests the other fields here


class TeiEmbedRequest(TeiEmbedSparseRequest):
    normalize: StrictBool = True
    dimensions: StrictInt | None = None


def parse_with_parameters(body: bytes, schema: type[BaseModel]) -> BaseModel:
    """A body of `schema`, whose fields may also sit in "parameters" (huggingface_hub nests them there)."""
    req = parse_json_body(body, schema)
    if req.parameters:
        fields = {**req.model_dump(exclude={"parameters"}, exclude_unset=True),
                  **{k: v for k, v in req.parameters.items() if v is not None}}
        req = parse_json_body(json.dumps(fields).encode(), schema)
    return req


def parse_embed_request(body: bytes) -> EmbeddingRequest:
    """A TEI /embed body as the EmbeddingRequest it asks for; APIError (400) for a bad one."""
    req = parse_with_parameters(body, TeiEmbedRequest)
    return EmbeddingRequest(input=req.inputs, normalize=req.normalize, truncate=req.truncate,
                            truncation_side=req.truncation_direction.lower(), prompt_name=req.prompt_name,
                            dimensions=req.dimensions)


def error_body(error: APIError) -> tuple[int, bytes]:
    """TEI's status and body for an error: a client's mistake is 422 there, 400 on OpenAI's routes."""
    status = 422 if error.status == 400 else error.status
    kind = ERROR_TYPES.get(status, "Backend")
    return status, json.dumps({"error": error.message, "error_type": kind}).encode()


def render_vectors(vectors) -> bytes:
    """[[float]], one list per input."""
    return json.dumps(vectors.tolist(), separators=(",", ":")).encode()


def model_kind(tasks: tuple, pooling: str | None, id2label: dict | None) -> dict:
    """TEI's model_type: {"embedding": {"pooling"}}, or a reranker's / classifier's labels."""
    if "embed" in tasks:
        return {"embedding": {"pooling": pooling or "model"}}
    if "sparse" in tasks:  # a SPLADE model, as TEI names its pooling
        return {"embedding": {"pooling": "splade"}}
    kind = "classifier" if "classify" in tasks else "reranker"
    return {kind: {"id2label": id2label or {}, "label2id": {v: k for k, v in (id2label or {}).items()}}}


def info(model_id: str, dtype: str, model_kind: dict, max_input_length: int, max_batch_tokens: int,
         max_batch_requests: int, max_client_batch_size: int, tokenization_workers: int, version: str) -> dict:
    return {"model_id": model_id, "model_sha": None, "model_dtype": dtype, "model_type": model_kind,
            "max_concurrent_requests": None, "max_input_length": max_input_length,
            "max_batch_tokens": max_batch_tokens, "max_batch_requests": max_batch_requests,
            "max_client_batch_size": max_client_batch_size, "tokenization_workers": tokenization_workers,
            "version": version, "sha": None, "docker_label": None}


def top_level_fields(body: bytes, markers: tuple[str, ...]) -> set[str]:
    """The fields of a JSON-object body, parsed only when the bytes hold one of `markers` (else, or for a
    body that is not a JSON object, none: the other API's parser says what is wrong with it)."""
    if not any(b'"' + m.encode() + b'"' in body for m in markers):
        return set()
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return set()
    return set(obj) if isinstance(obj, dict) else set()


RERANK_FIELDS = ("texts", "return_text", "truncate", "truncation_direction")  # what Cohere's and Jina's shape lack
TOKENIZE_FIELDS = ("inputs", "prompt_name")  # what SGLang's lacks


def is_rerank_body(body: bytes) -> bool:
    """TEI's /rerank body rather than Cohere's and Jina's: it has "texts", or no "documents" and another field
    of TEI's only (so that one missing its texts is answered in TEI's shape too)."""
    fields = top_level_fields(body, RERANK_FIELDS)
    return "texts" in fields or ("documents" not in fields and bool(fields & set(RERANK_FIELDS)))


def is_tokenize_body(body: bytes) -> bool:
    """TEI's /tokenize body rather than SGLang's: it has "inputs", or no "prompt" and a "prompt_name"."""
    fields = top_level_fields(body, TOKENIZE_FIELDS)
    return "inputs" in fields or ("prompt" not in fields and "prompt_name" in fields)


class TeiRerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = None  # taken; a pair over the context always loses the end of its text
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"


def prepare_rerank(body: bytes, model: ScoringModel, text: TextProcessor, check_model) -> PreparedTask:
    """A TEI /rerank body as the task it asks for, scored as scoring.prepare_rerank scores `documents`; the
    response is [{"index", "score", "text"?}], highest score first (`check_model` is unused: TEI names no
    model)."""
    req = parse_json_body(body, TeiRerankRequest)
    check_task(model, "rerank")
    if req.truncation_direction.lower() == "left":
        raise APIError(400, "truncation_direction Left is not supported for rerank yet, only Right: a pair longer "
                            "than the context loses the end of its text, never any of its query",
                       param="truncation_direction")
    if not req.query:
        raise APIError(400, "query must not be an empty string", param="query")
    check_text(req.query, "query", param="query")
    texts = parse_documents(req.texts, model.max_documents, param="texts")
    n = len(texts)
    sequences, starts, to_scores = score_pairs(model, text, [req.query] * n, texts, None, req.raw_scores, "query",
                                               ["query"] * n)

    def finish(rows) -> list[dict]:
        scores = to_scores(rows).tolist()
        order = sorted(range(n), key=lambda i: -scores[i])
        if req.return_text:
            return [{"index": i, "text": texts[i], "score": scores[i]} for i in order]
        return [{"index": i, "score": scores[i]} for i in order]

    return PreparedTask(sequences, starts, sum(map(len, sequences)), finish)


class TeiTokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: StrictStr | list[StrictStr]
    add_special_tokens: StrictBool = True
    prompt_name: StrictStr | None = None


def tokenize(body: bytes, text: TextProcessor) -> list[list[dict]]:
    """TEI's /tokenize: per input, its tokens as {"id", "text", "special", "start", "stop"}. TEI prepends the
    prompt (prompt_name's, else the model's default) and tokenizes without truncation; start and stop are
    character offsets into that string and text the span they cover, from the fast tokenizer's offset
    mapping; a special token (the special-tokens mask) has its own spelling as text and null offsets."""
    req = parse_json_body(body, TeiTokenizeRequest)
    single = isinstance(req.inputs, str)
    inputs = [req.inputs] if single else req.inputs
    if not inputs:
        raise APIError(400, "inputs must not be an empty list", param="inputs")
    check_num_inputs(inputs, "inputs")
    for i, t in enumerate(inputs):
        where = "inputs" if single else f"inputs[{i}]"
        if not t:
            raise APIError(400, f"{where} is an empty string", param="inputs")
        check_text(t, where, param="inputs")
    prompt = request_prompt(text, req.prompt_name)
    if not text.tokenizer.is_fast:
        raise APIError(400, "this model has no fast tokenizer, which token offsets need; POST /tokenize "
                            "{\"prompt\": ...} gives the token ids", param="inputs")
    strings = [prompt + t for t in inputs]
    enc = text.tokenizer(strings, add_special_tokens=req.add_special_tokens, truncation=False, verbose=False,
                         return_offsets_mapping=True, return_special_tokens_mask=True)
    out = []
    for i, s in enumerate(strings):
        tokens = zip(enc["input_ids"][i], enc["offset_mapping"][i], enc["special_tokens_mask"][i], enc.tokens(i))
        out.append([{"id": id_, "text": token, "special": True, "start": None, "stop": None} if special else
                    {"id": id_, "text": s[start:stop], "special": False, "start": start, "stop": stop}
                    for id_, (start, stop), special, token in tokens])
    return out


def parse_embed_sparse_request(body: bytes) -> EmbeddingRequest:
    """A TEI /embed_sparse body as the EmbeddingRequest for sparse vectors it asks for."""
    req = parse_with_parameters(body, TeiEmbedSparseRequest)
    return EmbeddingRequest(input=req.inputs, truncate=req.truncate, output="sparse",
                            truncation_side=req.truncation_direction.lower(), prompt_name=req.prompt_name)


def render_sparse(results: list) -> bytes:
    """[[{"index", "value"}]]: each input's nonzero entries, ascending indices."""
    return json.dumps([[{"index": i, "value": v} for i, v in zip(indices.tolist(), values.tolist())]
                       for indices, values in results], separators=(",", ":")).encode()
