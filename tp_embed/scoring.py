"""Rerank, score and classify on the wire: request schemas, validation, the token sequences a request
becomes, and the response its rows make.

    POST /v1/rerank, /rerank, /v2/rerank   a query and N documents -> results sorted by relevance
                                           (the shape vLLM, Jina and Cohere share; /rerank takes
                                           text-embeddings-inference's too, tp_embed/tei.py)
    POST /v1/score, /score                 text_1 x text_2 (1:1, 1:N, N:N) -> one score per pair (vLLM's)
    POST /v1/classify, /classify           texts -> label and probabilities (vLLM's)

A cross-encoder or reranker (a model with a head) scores each pair in one forward pass; an embedding model
scores by the cosine of the query's and the document's vectors, with its "query" and "document" prompts
where it has them (sentence-transformers' encode_query / encode_document). Everything here runs on rank 0
in the tokenizer pool before a request is admitted, so a client mistake is a 400 that never reaches a rank.
"""

import time
import uuid
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from tp_embed.config import HeadConfig
from tp_embed.openai_protocol import APIError, check_num_inputs, check_text, json_kind, parse_json_body
from tp_embed.pairs import QueryTooLongError, cut_documents, encode_pairs
from tp_embed.text import InputTooLongError, TextProcessor

# sentence-transformers' encode_document tries these prompt names in order
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


class RerankRequest(BaseModel):
    """POST /v1/rerank. `instruction` is Qwen3-Reranker's; `raw_scores` (text-embeddings-inference's name)
    returns logits instead of sigmoid scores; `max_tokens_per_doc` and `priority` are Cohere's (the latter is
    accepted and not used: requests run in arrival order)."""
    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    documents: list
    model: StrictStr | None = None
    top_n: StrictInt | None = None
    return_documents: StrictBool = True
    instruction: StrictStr | None = None
    raw_scores: StrictBool = False
    max_tokens_per_doc: StrictInt | None = None
    priority: StrictInt | None = None
    relevant_spans: object = None  # Cohere's; only null is taken


class ScoreRequest(BaseModel):
    """POST /v1/score, vLLM's shape."""
    model_config = ConfigDict(extra="forbid")

    text_1: object  # a string or a list of strings, checked by parse_texts
    text_2: object
    model: StrictStr | None = None
    instruction: StrictStr | None = None
    raw_scores: StrictBool = False


class ClassifyRequest(BaseModel):
    """POST /v1/classify, vLLM's shape; `truncate` as in /v1/embeddings."""
    model_config = ConfigDict(extra="forbid")

    input: object  # a string or a list of strings, checked by parse_texts
    model: StrictStr | None = None
    truncate: StrictBool | None = None


@dataclass(frozen=True)
class ScoringModel:
    """What request preparation needs to know of the served model."""
    name: str
    tasks: tuple[str, ...]
    head: HeadConfig | None  # None: an embedding model, scored by cosine
    max_documents: int  # --max-rerank-documents
    allow_auto_truncate: bool


@dataclass
class PreparedTask:
    """A scoring request as the scheduler runs it: its token sequences (and segment starts for pairs), and
    `finish`, which turns the job's rows (in sequence order) into the response body."""
    sequences: list[list[int]]
    type_starts: list[int] | None
    num_tokens: int
    finish: Callable[[torch.Tensor], dict]


def check_task(model: ScoringModel, task: str) -> None:
    if task not in model.tasks:
        raise APIError(400, f"{model.name} does not serve the {task} task; it serves {', '.join(model.tasks)}",
                       code="task_not_supported")


def scores_from_logits(logits: torch.Tensor, head: HeadConfig, raw: bool) -> torch.Tensor:
    """A one-label head's scores [n]: its activation (sigmoid, as CrossEncoder.predict gives by default),
    or the logits when `raw` or the model's activation is the identity."""
    logit = logits[:, 0].float()
    return logit if raw or head.activation == "identity" else torch.sigmoid(logit)


def probabilities(logits: torch.Tensor, head: HeadConfig) -> torch.Tensor:
    """[n, num_labels]: softmax over the labels, or a sigmoid each for one label or a multi-label problem."""
    if head.num_labels == 1 or head.activation == "sigmoid":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=-1)


def parse_documents(raw: list, limit: int, param: str = "documents") -> list[str]:
    """Documents as strings or {"text": str} objects; at least one, at most `limit`. `param` names the field
    in errors (TEI's /rerank calls it texts)."""
    if not raw:
        raise APIError(400, f"{param} must not be an empty list", param=param)
    if len(raw) > limit:
        raise APIError(400, f"{param} has {len(raw)} entries; at most {limit} are allowed per request "
                            f"(--max-rerank-documents)", param=param)
    texts = []
    for i, doc in enumerate(raw):
        if isinstance(doc, dict) and set(doc) == {"text"}:
            doc = doc["text"]
        if not isinstance(doc, str):
            raise APIError(400, f"{param}[{i}] is {json_kind(doc)}; a document is a string or an object "
                                f"{{\"text\": string}}", param=param)
        if not doc:
            raise APIError(400, f"{param}[{i}] is an empty string", param=param)
        check_text(doc, f"{param}[{i}]", param=param)
        texts.append(doc)
    return texts


def parse_texts(raw: object, param: str) -> list[str]:
    """A string or a non-empty list of non-empty strings."""
    if not isinstance(raw, (str, list)):
        raise APIError(400, f"{param} must be a string or a list of strings, got {json_kind(raw)}", param=param)
    texts = [raw] if isinstance(raw, str) else raw
    if not texts:
        raise APIError(400, f"{param} must not be an empty list", param=param)
    check_num_inputs(texts, param)
    for i, t in enumerate(texts):
        where = param if isinstance(raw, str) else f"{param}[{i}]"
        if not isinstance(t, str):
            raise APIError(400, f"{where} is {json_kind(t)}; {param} holds strings", param=param)
        if not t:
            raise APIError(400, f"{where} is an empty string", param=param)
        check_text(t, where, param=param)
    return texts


def check_instruction(model: ScoringModel, instruction: str | None) -> None:
    if instruction is None:
        return
    if model.head is None or model.head.pair_template is None:
        raise APIError(400, f"instruction applies to rerankers with a prompt template (Qwen3-Reranker); "
                            f"{model.name} does not take one", param="instruction")
    check_text(instruction, "instruction", param="instruction")


def pair_sequences(model: ScoringModel, text: TextProcessor, queries: list[str], documents: list[str],
                   instruction: str | None, param: str, names: list[str]) -> tuple[list, list | None]:
    """A head model's pair encodings; a query too long is a 400 naming it."""
    try:
        encoded = encode_pairs(text, model.head, queries, documents, instruction, names)
    except QueryTooLongError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
    return encoded.sequences, encoded.type_starts


def embed_sequences(text: TextProcessor, texts: list[str], prompt_names: tuple[str, ...], truncate: bool,
                    param: str) -> list[list[int]]:
    """An embedding model's token ids for texts, with the first of `prompt_names` the model has."""
    name = next((n for n in prompt_names if n in text.prompts), None)
    try:
        return text.encode(texts, truncate, text.prompt(name) if name else "")
    except InputTooLongError as e:
        where = param if len(texts) == 1 else f"{param}[{e.index}]"
        raise APIError(400, f"{where} has {e.num_tokens} tokens, more than this model's context length of "
                            f"{e.limit}", param=param, code="context_length_exceeded") from None


def cosine(rows_a: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(rows_a.float(), dim=-1) * F.normalize(rows_b.float(), dim=-1)).sum(-1)


def usage(num_tokens: int) -> dict:
    return {"prompt_tokens": num_tokens, "total_tokens": num_tokens}


def score_pairs(model: ScoringModel, text: TextProcessor, queries: list[str], documents: list[str],
                instruction: str | None, raw: bool, query_param: str,
                query_names: list[str]) -> tuple[list, list | None, Callable[[torch.Tensor], torch.Tensor]]:
    """Sequences for scoring pairs (queries[i], documents[i]), and the function from the job's rows to
    the scores [n]. An embedding model embeds each distinct query once."""
    if model.head is not None:
        sequences, starts = pair_sequences(model, text, queries, documents, instruction, query_param, query_names)
        return sequences, starts, lambda rows: scores_from_logits(rows, model.head, raw)
    if raw:
        raise APIError(400, f"raw_scores applies to cross-encoders; {model.name} scores by cosine similarity",
                       param="raw_scores")
    position = {q: i for i, q in enumerate(dict.fromkeys(queries))}
    distinct = list(position)
    query_ids = embed_sequences(text, distinct, ("query",), model.allow_auto_truncate, query_param)
    doc_ids = embed_sequences(text, documents, DOCUMENT_PROMPT_NAMES, True, "documents")
    which = [position[q] for q in queries]
    return query_ids + doc_ids, None, lambda rows: cosine(rows[which], rows[len(distinct):])


def prepare_rerank(body: bytes, model: ScoringModel, text: TextProcessor, check_model) -> PreparedTask:
    req = parse_json_body(body, RerankRequest)
    check_model(req.model)
    check_task(model, "rerank")
    if not req.query:
        raise APIError(400, "query must not be an empty string", param="query")
    check_text(req.query, "query", param="query")
    documents = parse_documents(req.documents, model.max_documents)
    if req.relevant_spans is not None:
        raise APIError(400, "relevant_spans is not supported; leave it out", param="relevant_spans")
    if req.top_n is not None and req.top_n < 1:
        raise APIError(400, f"top_n must be at least 1, got {req.top_n}", param="top_n")
    if req.max_tokens_per_doc is not None:
        if req.max_tokens_per_doc < 1:
            raise APIError(400, f"max_tokens_per_doc must be at least 1, got {req.max_tokens_per_doc}",
                           param="max_tokens_per_doc")
        inputs = cut_documents(text, documents, req.max_tokens_per_doc)
    else:
        inputs = documents
    check_instruction(model, req.instruction)
    sequences, starts, to_scores = score_pairs(model, text, [req.query] * len(inputs), inputs, req.instruction,
                                               req.raw_scores, "query", ["query"] * len(inputs))
    num_tokens = sum(map(len, sequences))
    top_n = len(documents) if req.top_n is None else min(req.top_n, len(documents))

    def finish(rows: torch.Tensor) -> dict:
        scores = to_scores(rows).tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]
        results = [{"index": i, "relevance_score": scores[i]} for i in order]
        if req.return_documents:
            for result in results:
                result["document"] = {"text": documents[result["index"]]}
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": model.name, "usage": usage(num_tokens),
                "results": results, "meta": {"billed_units": {"input_tokens": num_tokens}}}

    return PreparedTask(sequences, starts, num_tokens, finish)


def prepare_score(body: bytes, model: ScoringModel, text: TextProcessor, check_model) -> PreparedTask:
    req = parse_json_body(body, ScoreRequest)
    check_model(req.model)
    check_task(model, "score")
    firsts, seconds = parse_texts(req.text_1, "text_1"), parse_texts(req.text_2, "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
        names = ["text_1"] * len(seconds)
    elif len(firsts) == len(seconds):
        names = [f"text_1[{i}]" for i in range(len(firsts))]
    else:
        raise APIError(400, f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: pair them 1 to 1, 1 to N "
                            f"or N to N", param="text_2")
    check_instruction(model, req.instruction)
    sequences, starts, to_scores = score_pairs(model, text, firsts, seconds, req.instruction, req.raw_scores,
                                               "text_1", names)
    num_tokens = sum(map(len, sequences))

    def finish(rows: torch.Tensor) -> dict:
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(to_scores(rows).tolist())]
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": model.name, "data": data, "usage": usage(num_tokens)}

    return PreparedTask(sequences, starts, num_tokens, finish)


def prepare_classify(body: bytes, model: ScoringModel, text: TextProcessor, check_model) -> PreparedTask:
    req = parse_json_body(body, ClassifyRequest)
    check_model(req.model)
    check_task(model, "classify")
    texts = parse_texts(req.input, "input")
    truncate = model.allow_auto_truncate if req.truncate is None else req.truncate
    try:
        sequences = text.encode(texts, truncate)
    except InputTooLongError as e:
        raise APIError(400, str(e), param="input", code="context_length_exceeded") from None
    num_tokens = sum(map(len, sequences))
    head = model.head

    def finish(rows: torch.Tensor) -> dict:
        probs = probabilities(rows, head)
        data = [{"index": i, "label": head.labels[int(p.argmax())], "probs": p.tolist(),
                 "num_classes": head.num_labels} for i, p in enumerate(probs)]
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": model.name, "data": data, "usage": usage(num_tokens)}

    return PreparedTask(sequences, None, num_tokens, finish)
