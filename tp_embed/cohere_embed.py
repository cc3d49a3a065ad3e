"""Cohere's embed API, POST /v2/embed, on the same engine, with its compact vector types, so that the
`cohere` client (`ClientV2(base_url=...).embed(...)`) works unchanged.

Request: {"model", "texts": [...] or "images": [data URI or URL, ...] or "inputs": [{"content": [{"type": "text",
"text"}, {"type": "image_url", "image_url": {"url"}}]}] (images for a model that embeds them), "input_type",
"embedding_types": ["float", "int8", "uint8", "binary", "ubinary", "base64"] (default ["float"]),
"truncate": "NONE" (refuse a long input) | "END" (keep its beginning) | "START" (keep its end), "max_tokens"
(at most this many tokens an input, truncated as `truncate` says; default the context length),
"output_dimension"}. Response: {"id", "embeddings":
{type: [...]}, "texts", "meta": {"billed_units": {"input_tokens"}}, "response_type": "embeddings_by_type"}.

- input_type picks the model's named prompt (`prompt_for`): the prompt of that name, else search_query ->
  "query", search_document -> "document" / "passage", classification and clustering -> their capitalized
  names (EmbeddingGemma's); a model without a matching prompt embeds the text as it is.
- binary and ubinary are sentence-transformers' `quantize_embeddings`: the sign bits (> 0) packed 8 to a byte
  with numpy.packbits, ubinary as uint8, binary as that minus 128 in int8.
- int8 and uint8, with --embedding-calibration (`load_calibration`: ranges [2, dim], row 0 each dimension's
  minimum and row 1 its maximum, given as such or as the min and max of calibration embeddings [n, dim]), are
  sentence-transformers' `quantize_embeddings(v, precision, ranges=ranges)`: 255 equal steps per dimension,
  step = (max - min) / 255 (1 where max = min), uint8 = clip(floor((v - min) / step), 0, 255), int8 = uint8 - 128;
  with output_dimension d, of the first d columns of the ranges.
- Without a calibration file, int8 and uint8 use one symmetric scale per vector, its largest |component|:
  int8 = round(127 v / max|v|), uint8 = round(127.5 (v / max|v| + 1)). Cosine similarity survives (a vector's
  scale cancels); no calibration data is needed.
- base64: each vector's float32 bytes, little-endian, base64-encoded.
"""

import base64
import json
import uuid
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from tp_embed.errors import ConfigError
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


def inputs_of(req: CohereEmbedRequest) -> tuple[list, list[str]]:
    """The request's inputs as /v1/embeddings takes them, and its texts for the response: `texts` as they are;
    `images` as {"image"} items; `inputs` as their texts (text parts joined by spaces), or as {"text", "image"}
    items when one of them holds an image (an `image_url` part, at most one an input)."""
    given = [name for name in ("texts", "images", "inputs") if getattr(req, name) is not None]
    if len(given) != 1:
        raise APIError(400, "give exactly one of texts, images and inputs", param="texts")
    if req.texts is not None:
        check_num_inputs(req.texts, "texts")
        return req.texts, req.texts
    if req.images is not None:
        check_num_inputs(req.images, "images")
        return [{"image": image} for image in req.images], []
    check_num_inputs(req.inputs, "inputs")
    items = [content_of(i, item) for i, item in enumerate(req.inputs)]
    texts = [text for text, _ in items if text is not None]
    if all(image is None for _, image in items):
        return texts, texts
    return [{k: v for k, v in (("text", text), ("image", image)) if v is not None} for text, image in items], texts


def content_of(i: int, item) -> tuple[str | None, str | None]:
    """One of `inputs`' {"content": [{"type": "text", "text"} | {"type": "image_url", "image_url": {"url"}}]}
    as (its text parts joined, or None; its image, or None)."""
    shape = ('{"content": [{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}, '
             '...]}')
    parts = item.get("content") if isinstance(item, dict) else None
    if not isinstance(parts, list) or not parts:
        raise APIError(400, f"inputs[{i}] must be {shape}", param=f"inputs[{i}]")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        url = part.get("image_url") if kind == "image_url" else None
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise APIError(400, f"inputs[{i}] must be {shape}", param=f"inputs[{i}]")
        images.append(url)
    if len(images) > 1:
        raise APIError(400, f"inputs[{i}] has {len(images)} images; one input embeds at most one",
                       param=f"inputs[{i}]")
    return (" ".join(texts) if texts else None), (images[0] if images else None)


def parse_request(body: bytes, prompts: dict) -> tuple[EmbeddingRequest, CohereEmbedRequest, list[str]]:
    """A /v2/embed body as the EmbeddingRequest it asks for, the Cohere request and its texts (for the
    response); APIError (400) for a bad one. Items (an image among the inputs) take no prompt: input_type then names
    none."""
    req = parse_json_body(body, CohereEmbedRequest)
    inputs, texts = inputs_of(req)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {req.max_tokens}", param="max_tokens")
    items = bool(inputs) and isinstance(inputs[0], dict)
    if items and req.max_tokens is not None:
        raise APIError(400, "max_tokens applies to text inputs; inputs with images are cut as the model's processor "
                            "cuts them", param="max_tokens")
    embed = EmbeddingRequest(input=inputs, model=req.model, dimensions=req.output_dimension,
                             truncate=req.truncate != "NONE",
                             truncate_prompt_tokens=None if items else req.max_tokens,
                             truncation_side=None if items else "left" if req.truncate == "START" else "right",
                             prompt_name=None if items else prompt_for(req.input_type, prompts))
    return embed, req, texts


def load_calibration(path: str | None) -> np.ndarray | None:
    """--embedding-calibration: float32 ranges [2, dim] from a .npy of ranges [2, dim] (row 0 each dimension's
    minimum, row 1 its maximum: sentence-transformers' `ranges`) or of calibration embeddings [n >= 3, dim]
    (its `calibration_embeddings`, whose per-dimension min and max they are). ConfigError for a file it cannot
    use; None without a path."""
    if path is None:
        return None
    where = f"--embedding-calibration {path}"
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{where}: not a readable .npy file ({e})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ConfigError(f"{where}: an .npz archive; save one array with numpy.save")
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise ConfigError(f"{where}: an array of shape {list(array.shape)}; expected ranges [2, dim] (minima, then "
                          f"maxima) or calibration embeddings [n, dim] with n >= 3")
    if array.dtype.kind != "f":
        raise ConfigError(f"{where}: an array of {array.dtype}; expected floats")
    if array.shape[0] == 2:
        bad = np.flatnonzero(array[0] > array[1])
        if bad.size:
            j = int(bad[0])
            raise ConfigError(f"{where}: a file of two rows is read as ranges (row 0 each dimension's minimum, row 1 "
                              f"its maximum), but dimension {j} has {array[0, j]} above {array[1, j]}; calibration "
                              f"embeddings need 3 rows or more")
        ranges = array
    else:  # sentence-transformers' _get_quantization_ranges
        ranges = np.vstack((np.min(array, axis=0), np.max(array, axis=0)))
    with np.errstate(over="ignore", invalid="ignore"):  # what overflows is refused just below
        ranges = ranges.astype(np.float32)
    if not np.isfinite(ranges).all():
        raise ConfigError(f"{where}: holds values that are not finite float32 numbers (NaN, inf, or over 3.4e38)")
    return ranges


def check_calibration(ranges: np.ndarray, path: str, model_name: str, embedding_size: int | None) -> None:
    """The ranges of --embedding-calibration fit the model's vectors (`embedding_size`; None for a model
    that does not embed)."""
    if embedding_size is None:
        raise ConfigError(f"--embedding-calibration {path}: {model_name} does not embed; the file calibrates "
                          f"/v2/embed's int8 and uint8 vectors")
    if ranges.shape[1] != embedding_size:
        raise ConfigError(f"--embedding-calibration {path} has {ranges.shape[1]} dimensions, but {model_name} "
                          f"returns {embedding_size}-dimensional embeddings; calibrate with this model's embeddings")


def quantize_with_ranges(vectors: np.ndarray, kind: str, ranges: np.ndarray) -> np.ndarray:
    """sentence-transformers' quantize_embeddings(vectors, kind, ranges=ranges) for int8 and uint8, the same
    float32 operations: 255 steps from each dimension's minimum (ranges[0]) to its maximum (ranges[1])."""
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    levels = np.clip(np.floor((vectors - starts) / steps), 0, 255)  # [n, d]
    return levels.astype(np.uint8) if kind == "uint8" else (levels - 128).astype(np.int8)


def quantize(vectors: np.ndarray, kind: str, ranges: np.ndarray | None = None) -> list:
    """float32 [n, d] as one of EMBEDDING_TYPES, JSON-ready; int8 and uint8 by `ranges` [2, >= d] (its first d
    columns) when given, else by each vector's largest |component|."""
    if kind == "float":
        return vectors.tolist()
    if kind == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    if kind in ("binary", "ubinary"):
        bits = np.packbits(vectors > 0, axis=-1)
        return (bits if kind == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)).tolist()
    if ranges is not None:
        return quantize_with_ranges(vectors, kind, ranges[:, :vectors.shape[1]]).tolist()
    unit = vectors / np.maximum(np.abs(vectors).max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    if kind == "int8":
        return np.rint(unit * 127).astype(np.int8).tolist()
    return np.rint((unit + 1) * 127.5).astype(np.uint8).tolist()


def render(vectors: np.ndarray, req: CohereEmbedRequest, texts: list[str], num_tokens: int,
           ranges: np.ndarray | None = None) -> bytes:
    """The response body: each asked type once, in the order asked; `ranges` calibrate int8 and uint8."""
    types = req.embedding_types or ["float"]
    return json.dumps({
        "id": str(uuid.uuid4()),
        "embeddings": {kind: quantize(vectors, kind, ranges) for kind in dict.fromkeys(types)},
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": num_tokens}},
        "response_type": "embeddings_by_type"}, separators=(",", ":")).encode()
