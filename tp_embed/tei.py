"""text-embeddings-inference's embedding routes on the same engine, so its clients (huggingface_hub's
InferenceClient, LangChain's and LlamaIndex's TEI integrations) work unchanged:

- POST /embed: {"inputs": str | [str] (or token ids), "normalize" (default true), "truncate",
  "truncation_direction" ("Right": keep the beginning), "prompt_name", "dimensions"} -> [[float]]. The fields
  may also come nested in "parameters", as huggingface_hub's InferenceClient sends them.
- POST /: TEI dispatches by the model's task; here an embedding model embeds, another says which routes it
  serves.
- GET /info: the model and the server's limits, in TEI's shape.
Errors on these routes take TEI's shape, {"error": message, "error_type": kind}, and its statuses: 422 for a
bad request (OpenAI's routes answer 400), 413 for one too large, 429 when the queue is full.
"""

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from tp_embed.openai_protocol import APIError, EmbeddingRequest, parse_json_body

ROUTES = ("/embed", "/", "/info")
ERROR_TYPES = {401: "Unauthorized", 413: "Validation", 422: "Validation", 429: "Overloaded", 499: "Cancelled",
               503: "Unhealthy"}


class TeiEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: object  # str | list[str] | list[int] | list[list[int]], checked as /v1/embeddings' input
    normalize: StrictBool = True
    truncate: StrictBool | None = None
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    prompt_name: StrictStr | None = None
    dimensions: StrictInt | None = None
    parameters: dict | None = None  # huggingface_hub nests the fields above here


def parse_embed_request(body: bytes) -> EmbeddingRequest:
    """A TEI /embed body as the EmbeddingRequest it asks for; APIError (400) for a bad one."""
    req = parse_json_body(body, TeiEmbedRequest)
    if req.parameters:
        fields = {**req.model_dump(exclude={"parameters"}, exclude_unset=True),
                  **{k: v for k, v in req.parameters.items() if v is not None}}
        req = parse_json_body(json.dumps(fields).encode(), TeiEmbedRequest)
    if req.truncation_direction.lower() == "left":
        raise APIError(400, "truncation_direction Left is not supported: tp-embed keeps the beginning of an input "
                            "that it truncates (Right)", param="truncation_direction")
    return EmbeddingRequest(input=req.inputs, normalize=req.normalize, truncate=req.truncate,
                            prompt_name=req.prompt_name, dimensions=req.dimensions)


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
    kind = "classifier" if "classify" in tasks else "reranker"
    return {kind: {"id2label": id2label or {}, "label2id": {v: k for k, v in (id2label or {}).items()}}}


def info(model_id: str, dtype: str, model_kind: dict, max_input_length: int, max_batch_tokens: int,
         max_batch_requests: int, max_client_batch_size: int, tokenization_workers: int, version: str) -> dict:
    return {"model_id": model_id, "model_sha": None, "model_dtype": dtype, "model_type": model_kind,
            "max_concurrent_requests": None, "max_input_length": max_input_length,
            "max_batch_tokens": max_batch_tokens, "max_batch_requests": max_batch_requests,
            "max_client_batch_size": max_client_batch_size, "tokenization_workers": tokenization_workers,
            "version": version, "sha": None, "docker_label": None}
