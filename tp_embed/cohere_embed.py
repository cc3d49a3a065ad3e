"""Cohere's embed API, POST /v2/embed, on the same engine, with its compact vector types, so that the
`cohere` client (`ClientV2(base_url=...).embed(...)`) works unchanged.

Request: {"model", "texts": [...] or "inputs": [{"content": [{"type": "text", "text"}]}], "input_type",
"embedding_types": ["float", "int8", "uint8", "binary", "ubinary", "base64"] (default ["float"]),
"truncate": "NONE" | "END" (keep the beginning; START is refused), "output_dimension"} (max_tokens is refused:
the model's context length applies). Response: {"id", "embeddings":
{type: [...]}, "texts", "meta": {"billed_units": {"input_tokens"}}, "response_type": "embeddings_by_type"}.

- input_type picks the model's named prompt (`prompt_for`): the prompt of that name, else search_query ->
  "query", search_document -> "document" / "passage", classification and clustering -> their capitalized
  names (EmbeddingGemma's); a model without a matching prompt embeds the text as it is.
- binary and ubinary are sentence-transformers' `quantize_embeddings`: the sign bits (> 0) packed 8 to a byte
  with numpy.packbits, ubinary as uint8, binary as that minus 128 in int8.
- int8 and uint8 use one symmetric scale per vector, its largest |component|: int8 = round(127 v / max|v|),
  uint8 = round(127.5 (v / max|v| + 1)). Cosine similarity survives (a vector's scale cancels); no
  calibration data is needed.
- base64: each vector's float32 bytes, little-endian, base64-encoded.
"""

import base64
import json
import uuid
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from tp_embed.openai_protocol import APIError, EmbeddingRequest, check_num_inputs, parse_json_body

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
PROMPT_NAMES = {"search_query": ("query",), "search_document": ("document", "passage"),
                "classification": ("Classification", "classification"), "clustering": ("Clustering", "clustering"),
                "image": ()}


class CohereEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    texts: list[StrictStr] | None = None
    images: list[StrictStr] | None = None
    inputs: list[dict] | None = None
    input_type: Literal["search_query", "search_document", "classification", "clustering", "image"] | None = None
    embedding_types: list[Literal[EMBEDDING_TYPES]] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    output_dimension: StrictInt | None = None
    max_tokens: StrictInt | None = None
    priority: StrictInt | None = None  # Cohere's scheduling hint: accepted, not used


def prompt_for(input_type: str | None, prompts: dict) -> str | None:
    """The model's named prompt for a Cohere input_type, or None (the text as it is)."""
    if input_type is None:
        return None
    for name in (input_type, *PROMPT_NAMES[input_type]):
        if name in prompts:
            return name
    return None


def texts_of(req: CohereEmbedRequest) -> list[str]:
    """The request's texts: `texts`, or the text parts of `inputs` (one text per input)."""
    given = [name for name in ("texts", "images", "inputs") if getattr(req, name) is not None]
    if len(given) != 1:
        raise APIError(400, "give exactly one of texts, images and inputs", param="texts")
    if req.images is not None:
        raise APIError(400, "images are not supported by /v2/embed; send texts", param="images")
    if req.texts is not None:
        check_num_inputs(req.texts, "texts")
        return req.texts
    check_num_inputs(req.inputs, "inputs")
    texts = []
    for i, item in enumerate(req.inputs):
        parts = item.get("content") if isinstance(item, dict) else None
        if not isinstance(parts, list) or not parts or not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise APIError(400, f"inputs[{i}] must be {{\"content\": [{{\"type\": \"text\", \"text\": ...}}]}} (text "
                                f"only)", param=f"inputs[{i}]")
        texts.append(" ".join(p["text"] for p in parts))
    return texts


def parse_request(body: bytes, prompts: dict) -> tuple[EmbeddingRequest, CohereEmbedRequest]:
    """A /v2/embed body as the EmbeddingRequest it asks for, and the Cohere request (for the response);
    APIError (400) for a bad one."""
    req = parse_json_body(body, CohereEmbedRequest)
    texts = texts_of(req)
    if req.truncate == "START":
        raise APIError(400, "truncate START is not supported: tp-embed keeps the beginning of an input it "
                            "truncates (END)", param="truncate")
    if req.max_tokens is not None:
        raise APIError(400, "max_tokens is not supported: the model's context length applies (truncate END cuts "
                            "there)", param="max_tokens")
    embed = EmbeddingRequest(input=texts, model=req.model, dimensions=req.output_dimension,
                             truncate=req.truncate == "END", prompt_name=prompt_for(req.input_type, prompts))
    return embed, req


def quantize(vectors: np.ndarray, kind: str) -> list:
    """float32 [n, d] as one of EMBEDDING_TYPES, JSON-ready."""
    if kind == "float":
        return vectors.tolist()
    if kind == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    if kind in ("binary", "ubinary"):
        bits = np.packbits(vectors > 0, axis=-1)
        return (bits if kind == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)).tolist()
    unit = vectors / np.maximum(np.abs(vectors).max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    if kind == "int8":
        return np.rint(unit * 127).astype(np.int8).tolist()
    return np.rint((unit + 1) * 127.5).astype(np.uint8).tolist()


def render(vectors: np.ndarray, req: CohereEmbedRequest, num_tokens: int) -> bytes:
    """The response body: each asked type once, in the order asked."""
    types = req.embedding_types or ["float"]
    return json.dumps({
        "id": str(uuid.uuid4()), "embeddings": {kind: quantize(vectors, kind) for kind in dict.fromkeys(types)},
        "texts": texts_of(req), "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": num_tokens}},
        "response_type": "embeddings_by_type"}, separators=(",", ":")).encode()
