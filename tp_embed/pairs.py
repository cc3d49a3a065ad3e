"""Rank 0: (query, document) pairs -> token ids for a cross-encoder or a reranker's prompt.

Two ways a model reads a pair, chosen by its head (HeadConfig.pair_template):

    segments (cross-encoders)  the tokenizer's pair encoding, [CLS] query [SEP] document [SEP] with token
                               types 0 then 1 (BERT), or <s> query </s></s> document </s> (XLM-R)
    "qwen3-reranker"           Qwen3-Reranker's published prompt: a system line, then
                               "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}" as the
                               user turn, then the assistant turn opening with an empty think block

A pair longer than the context loses the end of its document, never any of its query (sentence-
transformers' `only_second`); a query that leaves no room for a document is a QueryTooLongError.
"""

from dataclasses import dataclass

from tp_embed.config import HeadConfig
from tp_embed.text import TextProcessor

QWEN3_RERANKER_SYSTEM = ("Judge whether the Document meets the requirements based on the Query and the Instruct "
                         "provided. Note that the answer can only be \"yes\" or \"no\".")
QWEN3_RERANKER_PREFIX = f"<|im_start|>system\n{QWEN3_RERANKER_SYSTEM}<|im_end|>\n<|im_start|>user\n"
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANKER_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PAIR_TEMPLATES = ("qwen3-reranker",)


class QueryTooLongError(ValueError):
    def __init__(self, where: str, num_tokens: int, limit: int):
        self.where = where
        super().__init__(f"{where} takes {num_tokens} tokens, which leaves no room for a document in this "
                         f"model's context of {limit} tokens; shorten it")


@dataclass
class EncodedPairs:
    sequences: list[list[int]]
    type_starts: list[int] | None  # where each sequence's second segment starts; None: one segment each


def cut_documents(text: TextProcessor, documents: list[str], max_tokens: int) -> list[str]:
    """Each document cut after its first `max_tokens` tokens (Cohere's max_tokens_per_doc), at the
    character where its token `max_tokens` ends."""
    enc = text.tokenizer(documents, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [doc if len(offsets) <= max_tokens else doc[:offsets[max_tokens - 1][1]]
            for doc, offsets in zip(documents, enc["offset_mapping"])]


def encode_pairs(text: TextProcessor, head: HeadConfig, queries: list[str], documents: list[str],
                 instruction: str | None = None, query_names: list[str] | None = None) -> EncodedPairs:
    """Token ids of each (queries[i], documents[i]) pair as the model reads it; `query_names` name the
    queries in errors (default "query")."""
    names = query_names or ["query"] * len(queries)
    if head.pair_template == "qwen3-reranker":
        return EncodedPairs(encode_qwen3_reranker(text, queries, documents, instruction, names), None)
    return encode_segments(text, queries, documents, names)


def encode_segments(text: TextProcessor, queries: list[str], documents: list[str],
                    names: list[str]) -> EncodedPairs:
    tokenizer, limit = text.tokenizer, text.max_length
    overhead = tokenizer.num_special_tokens_to_add(pair=True)
    checked = {}
    for query, name in zip(queries, names):
        if query not in checked:
            checked[query] = len(tokenizer(query, add_special_tokens=False, verbose=False)["input_ids"])
            if checked[query] + overhead + 1 > limit:
                raise QueryTooLongError(name, checked[query] + overhead, limit)
    enc = tokenizer(queries, documents, truncation="only_second", max_length=limit, return_token_type_ids=True,
                    verbose=False)
    starts = [types.index(1) if 1 in types else len(types) for types in enc["token_type_ids"]]
    lengths = [len(ids) for ids in enc["input_ids"]]
    return EncodedPairs(enc["input_ids"], None if starts == lengths else starts)


def encode_qwen3_reranker(text: TextProcessor, queries: list[str], documents: list[str], instruction: str | None,
                          names: list[str]) -> list[list[int]]:
    """The model card's recipe: the formatted pair tokenized as one text and cut at the right to the context
    less the prefix and suffix, between the prefix's and the suffix's tokens."""
    tokenizer, limit = text.tokenizer, text.max_length
    prefix = tokenizer.encode(QWEN3_RERANKER_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(QWEN3_RERANKER_SUFFIX, add_special_tokens=False)
    budget = limit - len(prefix) - len(suffix)
    instruction = QWEN3_RERANKER_INSTRUCTION if instruction is None else instruction
    heads = [f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: " for query in queries]
    enc = tokenizer([h + d for h, d in zip(heads, documents)], return_offsets_mapping=True, verbose=False)
    sequences = []
    for ids, offsets, head, name in zip(enc["input_ids"], enc["offset_mapping"], heads, names):
        if len(ids) > budget:
            # the tokens that end before the document starts must all stay
            kept = sum(1 for _, end in offsets if end <= len(head) - 1)
            if kept >= budget:
                raise QueryTooLongError(f"{name} with the instruction", kept + limit - budget, limit)
            ids = ids[:budget]
        sequences.append(prefix + list(ids) + suffix)
    return sequences
