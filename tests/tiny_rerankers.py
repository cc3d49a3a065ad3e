"""Tiny RANDOM cross-encoder / classifier / Qwen3-Reranker checkpoints, built locally, and the reference scorers the
server's rerank and classification outputs are compared against.

Built on tests/tiny_models.py (its tokenizer builders, `_randomize`, `_save`, sizes and the large-std convention:
weights ~ N(0, 0.2), norm weights 1 +- 0.2, every bias non-zero, so that mistakes give large differences). Everything
is float32, deterministic given `seed` (also across processes) and offline. Every `make_*` factory writes a complete
transformers model directory into `path` (config.json + model.safetensors + tokenizer.json + tokenizer_config.json)
and returns `path`; there are no sentence-transformers module files (CrossEncoder loads plain transformers
*ForSequenceClassification directories, like the cross-encoder/ms-marco-* and BAAI/bge-reranker-* checkpoints).

Factories
---------
* `make_bert_cross_encoder(path, num_labels=1, seed=0, id2label=None)`: `BertForSequenceClassification` (keys
  `bert.embeddings.*`, `bert.encoder.layer.*`, `bert.pooler.dense.*` -- the pooler is kept, the classifier reads it --
  and `classifier.weight` [num_labels, 64] / `classifier.bias`), type_vocab_size 2, hidden 64, 4 heads, 2 layers,
  vocabulary ENCODER_VOCAB_SIZE (501), the uncased WordPiece tokenizer of tiny_models (`[CLS] a [SEP] b [SEP]` with
  token_type_ids 0 for `[CLS] a [SEP]` and 1 for `b [SEP]`). num_labels=1 is an ms-marco style relevance scorer;
  num_labels=3 gets id2label {0: "negative", 1: "neutral", 2: "positive"} unless `id2label` is given.
* `make_xlmr_cross_encoder(path, num_labels=1, seed=0)`: bge-reranker-v2-m3 style `XLMRobertaForSequenceClassification`
  (keys `roberta.embeddings.*`, `roberta.encoder.layer.*`, NO pooler, head `classifier.dense.*` [64, 64] +
  `classifier.out_proj.*` [num_labels, 64] on the <s> token), pad_token_id 1 (positions start at 2, so
  max_position_embeddings = MAX_SEQ_LENGTH + 2 = 258), type_vocab_size 1, the XLM-R Unigram tokenizer
  (`<s> a </s></s> b </s>`, no token_type_ids).
* `make_multilabel_classifier(path, seed=0)`: BERT classifier, 3 labels {0: "sports", 1: "politics", 2: "technology"}
  and `"problem_type": "multi_label_classification"` in config.json (per-label sigmoid, rows do not sum to 1).
* `make_qwen3_reranker(path, seed=0, tie_word_embeddings=False)`: Qwen/Qwen3-Reranker-* style `Qwen3ForCausalLM`
  (architectures ["Qwen3ForCausalLM"], keys `model.*` + `lm_head.weight`; with tie_word_embeddings=True -- as in
  Qwen3-Reranker-0.6B / 4B -- there is NO lm_head.weight in the safetensors), 3 layers, hidden 64, 4 query heads,
  2 KV heads, head_dim 16 (tp 1, 2 and 4 divide both head counts), q/k RMSNorm, no attention bias, vocabulary
  QWEN3_RERANKER_VOCAB_SIZE = 515 (> the tokenizer's 505 entries, 4 does not divide it), max_position_embeddings =
  tokenizer model_max_length = QWEN3_RERANKER_MAX_LENGTH = 512 (room for a ~200-token query + document plus the
  ~60-token template). config.json: eos_token_id = <|im_end|>, pad_token_id = bos_token_id = <|endoftext|>, like the
  real Qwen3 configs.

The Qwen3-Reranker tokenizer (`build_qwen3_reranker_tokenizer`)
---------------------------------------------------------------
A variant of tiny_models' byte-level BPE decoder tokenizer (same pre-tokenizer, decoder, trainer settings and
vocabulary size 500), with three documented differences:

1. "yes" and "no" are single vocabulary tokens, the ones the official recipe reads
   (`tokenizer.convert_tokens_to_ids("yes")` / `("no")`; the space-less forms, which is what follows
   "<think>\\n\\n</think>\\n\\n" in the assistant turn). The plain decoder tokenizer has neither (its 244 merges never
   reach them). Done with a CORPUS tweak, not by editing the vocabulary: the BPE is trained on tiny_models'
   corpus plus the reranker template (prefix, suffix, instruction; split at the special tokens, which are added
   afterwards) and the lines "yes" and "no" (each 20 times, a line-initial word has no leading "\u0120"), so the trainer
   learns the merges itself and `tokenizer.encode("yes")` is that one token too. The template words also merge
   into few tokens, which keeps the prompts short. `build_qwen3_reranker_tokenizer` asserts both tokens exist.
2. NO post-processor appending <|endoftext|> (a `ByteLevel(trim_offsets=False)` post-processor that adds nothing,
   as in the real Qwen2/Qwen3 tokenizer.json). The real Qwen3-Reranker tokenizer adds no special tokens at all; the
   embedding-style decoder tokenizer of tiny_models appends <|endoftext|> to every sequence, which through the
   recipe's `tokenizer(pairs, ...)` call would land in the middle of the prompt, between the pair text and the suffix.
3. Special tokens as in Qwen3: <|endoftext|>=500 (pad), <|im_start|>=501, <|im_end|>=502 (eos), then "<think>"=503
   and "</think>"=504 as added NON-special tokens (as in the real vocabulary, where they are single tokens that
   `skip_special_tokens` keeps). No BOS. padding_side "left" (how the model card loads it).

Reference scorers (CPU, float32)
--------------------------------
* `cross_encoder_scores(path, pairs, activation=True)`: sentence-transformers 6.3
  `CrossEncoder(path, device="cpu").predict(pairs)`; activation=True keeps CrossEncoder's default activation
  (`nn.Sigmoid()` for one label, `nn.Identity()` for several, unless config.json's "sentence_transformers" entry says
  otherwise), activation=False passes `activation_fn=nn.Identity()` (raw logits). Returns [n] for one label,
  [n, num_labels] otherwise (CrossEncoder batches with right padding).
* `classifier_probs(path, texts)` / `classifier_pair_probs(path, pairs)`: transformers
  `AutoModelForSequenceClassification`, one UNPADDED input at a time, then the text-classification pipeline's
  default function: sigmoid when config.problem_type == "multi_label_classification" or num_labels == 1, else softmax
  over the labels. `classifier_logits(path, inputs)` returns the raw logits.
* `qwen3_reranker_scores(path, query, documents, instruction=None, max_length=None)`: the Qwen3-Reranker model card
  recipe with `AutoModelForCausalLM`: each document formatted with `format_qwen3_reranker_pair`, tokenized by
  `qwen3_reranker_input_ids` exactly as the card's `process_inputs` (`tokenizer(pairs, padding=False,
  truncation="longest_first", return_attention_mask=False, max_length=max_length - len(prefix_tokens) -
  len(suffix_tokens))`, then prefix_tokens + ids + suffix_tokens, prefix/suffix via `tokenizer.encode(...,
  add_special_tokens=False)`; max_length defaults to the tokenizer's model_max_length, the card uses 8192), run ONE
  sequence at a time without padding, last position's logits of "no" and "yes", score =
  exp(log_softmax([no, yes])[1]) = softmax([no, yes])[1] = sigmoid(yes - no).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import numpy as np
import torch

from tiny_models import (
    DEFAULT_STD,
    ENCODER_VOCAB_SIZE,
    MAX_SEQ_LENGTH,
    _training_corpus,
    _wrap,
    bert_config,
    build_and_save,
    build_bert_tokenizer,
    build_xlmr_tokenizer,
    train_byte_level_bpe,
    xlmr_config,
)

__all__ = [
    "QWEN3_RERANKER_PREFIX",
    "QWEN3_RERANKER_SUFFIX",
    "QWEN3_RERANKER_DEFAULT_INSTRUCTION",
    "QWEN3_RERANKER_MAX_LENGTH",
    "QWEN3_RERANKER_VOCAB_SIZE",
    "SENTIMENT_LABELS",
    "MULTILABEL_LABELS",
    "build_qwen3_reranker_tokenizer",
    "make_bert_cross_encoder",
    "make_xlmr_cross_encoder",
    "make_multilabel_classifier",
    "make_qwen3_reranker",
    "cross_encoder_scores",
    "classifier_logits",
    "classifier_probs",
    "classifier_pair_probs",
    "format_qwen3_reranker_pair",
    "qwen3_reranker_input_ids",
    "qwen3_reranker_scores",
]

# The Qwen3-Reranker model card's template, verbatim.
QWEN3_RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
)
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANKER_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

QWEN3_RERANKER_MAX_LENGTH = 512  # tokenizer model_max_length and max_position_embeddings
QWEN3_RERANKER_VOCAB_SIZE = 515  # > 505 tokenizer entries; 4 does not divide it (515 = 5 * 103)

SENTIMENT_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
MULTILABEL_LABELS = {0: "sports", 1: "politics", 2: "technology"}

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_THINK_TOKENS = ["<think>", "</think>"]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------

def _reranker_corpus() -> list[str]:
    """tiny_models' corpus + the template pieces (special / think tokens cut out: they are added after training)
    5 times + the lines "yes" and "no" 20 times each, so that the BPE learns space-less "yes" and "no"."""
    specials = "|".join(re.escape(t) for t in _QWEN_SPECIALS + _THINK_TOKENS)
    template = QWEN3_RERANKER_PREFIX + format_qwen3_reranker_pair("", "") + QWEN3_RERANKER_SUFFIX
    pieces = [p for p in re.split(specials, template) if p.strip()]
    return _training_corpus() + pieces * 5 + ["yes", "no"] * 20


def build_qwen3_reranker_tokenizer(
    vocab_size: int = 500,
    model_max_length: int = QWEN3_RERANKER_MAX_LENGTH,
    padding_side: str = "left",
):
    """Byte-level BPE like tiny_models.build_decoder_tokenizer, trained on `_reranker_corpus()` so that "yes" and "no"
    are single tokens, with NO special tokens added to sequences (like the real Qwen3 tokenizer). See the module
    docstring."""
    from tokenizers import AddedToken, processors

    tok = train_byte_level_bpe(_reranker_corpus(), vocab_size)
    for word in ("yes", "no"):
        if tok.token_to_id(word) is None or tok.encode(word).ids != [tok.token_to_id(word)]:
            raise AssertionError(f"the reranker BPE did not learn {word!r} as one token")
    tok.add_special_tokens(_QWEN_SPECIALS)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _THINK_TOKENS])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no token, as in Qwen's tokenizer.json
    return _wrap(
        tok, model_max_length, padding_side,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_input_names=["input_ids", "attention_mask"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------------------------

def _labels(num_labels: int, id2label: dict | None) -> dict[int, str]:
    if id2label is None:
        id2label = SENTIMENT_LABELS if num_labels == 3 else {i: f"LABEL_{i}" for i in range(num_labels)}
    id2label = {int(k): str(v) for k, v in id2label.items()}
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(f"id2label {id2label} does not cover labels 0..{num_labels - 1}")
    return id2label


def make_bert_cross_encoder(
    path: str,
    num_labels: int = 1,
    seed: int = 0,
    id2label: dict | None = None,
    *,
    problem_type: str | None = None,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = ENCODER_VOCAB_SIZE,
    max_seq_length: int = MAX_SEQ_LENGTH,
    std: float = DEFAULT_STD,
) -> str:
    """ms-marco-MiniLM style BertForSequenceClassification (pooler kept), WordPiece tokenizer with token types."""
    from transformers import BertForSequenceClassification

    labels = _labels(num_labels, id2label)
    tokenizer = build_bert_tokenizer(model_max_length=max_seq_length)
    config = bert_config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_seq_length, num_labels=num_labels, id2label=labels,
                         label2id={v: k for k, v in labels.items()}, problem_type=problem_type,
                         architectures=["BertForSequenceClassification"])
    build_and_save(lambda: BertForSequenceClassification(config), tokenizer, path, seed, std)
    return path


def make_xlmr_cross_encoder(
    path: str,
    num_labels: int = 1,
    seed: int = 0,
    *,
    id2label: dict | None = None,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = ENCODER_VOCAB_SIZE,
    max_seq_length: int = MAX_SEQ_LENGTH,
    std: float = DEFAULT_STD,
) -> str:
    """bge-reranker-v2-m3 style XLMRobertaForSequenceClassification: head classifier.dense + classifier.out_proj."""
    from transformers import XLMRobertaForSequenceClassification

    labels = _labels(num_labels, id2label)
    tokenizer = build_xlmr_tokenizer(model_max_length=max_seq_length)
    config = xlmr_config(max_seq_length, vocab_size=vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         intermediate_size=intermediate_size, num_labels=num_labels, id2label=labels,
                         label2id={v: k for k, v in labels.items()},
                         architectures=["XLMRobertaForSequenceClassification"])
    build_and_save(lambda: XLMRobertaForSequenceClassification(config), tokenizer, path, seed, std)
    return path


def make_multilabel_classifier(path: str, seed: int = 0, *, std: float = DEFAULT_STD) -> str:
    """BERT classifier, 3 labels (MULTILABEL_LABELS), problem_type "multi_label_classification" in config.json."""
    make_bert_cross_encoder(path, num_labels=3, seed=seed, id2label=MULTILABEL_LABELS,
                            problem_type="multi_label_classification", std=std)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, encoding="utf-8") as f:
        if json.load(f).get("problem_type") != "multi_label_classification":
            raise AssertionError("problem_type was not saved in config.json")
    return path


def make_qwen3_reranker(
    path: str,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    *,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    num_hidden_layers: int = 3,
    intermediate_size: int = 96,
    vocab_size: int = QWEN3_RERANKER_VOCAB_SIZE,
    rope_theta: float = 1000000.0,
    max_length: int = QWEN3_RERANKER_MAX_LENGTH,
    std: float = DEFAULT_STD,
) -> str:
    """Qwen3-Reranker style Qwen3ForCausalLM + the reranker tokenizer ("yes"/"no" single tokens, nothing appended)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_qwen3_reranker_tokenizer(model_max_length=max_length)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < {len(tokenizer)} tokenizer entries")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_length,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        attention_bias=False,
        use_sliding_window=False,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=endoftext,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=endoftext,
        architectures=["Qwen3ForCausalLM"],
        dtype="float32",
    )
    build_and_save(lambda: Qwen3ForCausalLM(config), tokenizer, path, seed, std)
    return path


DECODER_CLASSIFIERS = ("qwen3", "qwen2", "mistral", "llama")


def make_decoder_classifier(path: str, family: str, num_labels: int = 3, seed: int = 0, *,
                            std: float = DEFAULT_STD) -> str:
    """A native decoder `*ForSequenceClassification` (`score.weight` [num_labels, 64] on the last token that is not
    the pad token), family one of DECODER_CLASSIFIERS: 2 layers, hidden 64, 4 query / 2 KV heads (head_dim 16; Qwen2
    with its qkv bias), vocabulary 1003, tiny_models' decoder tokenizer, which APPENDS <|endoftext|> = the pad
    token: transformers pools on the token before it, and so must the server. num_labels > 1 get SENTIMENT_LABELS
    for 3, LABEL_i otherwise."""
    import transformers

    from tiny_models import DECODER_VOCAB_SIZE, build_decoder_tokenizer

    names = {"qwen3": "Qwen3", "qwen2": "Qwen2", "mistral": "Mistral", "llama": "Llama"}
    config_cls = getattr(transformers, f"{names[family]}Config")
    model_cls = getattr(transformers, f"{names[family]}ForSequenceClassification")
    tokenizer = build_decoder_tokenizer(model_max_length=MAX_SEQ_LENGTH)
    extra = {"head_dim": 16} if family == "qwen3" else {}
    config = config_cls(vocab_size=DECODER_VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
                        id2label=_labels(num_labels, None) if num_labels > 1 else None, dtype="float32", **extra)
    build_and_save(lambda: model_cls(config), tokenizer, path, seed, std)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Reference scorers
# ---------------------------------------------------------------------------------------------------------------------

def cross_encoder_scores(path: str, pairs: Sequence[Sequence[str]], activation: bool = True,
                         **predict_kwargs) -> np.ndarray:
    """sentence-transformers `CrossEncoder(path, device="cpu").predict(pairs)` as float32 numpy: [n] for one label,
    [n, num_labels] otherwise. activation=True: CrossEncoder's default activation (sigmoid for one label, identity for
    several); activation=False: raw logits (activation_fn=nn.Identity()). predict_kwargs go to `predict`
    (batch_size=, apply_softmax=, ...)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(path, device="cpu", local_files_only=True)
    if not activation:
        predict_kwargs["activation_fn"] = torch.nn.Identity()
    predict_kwargs.setdefault("show_progress_bar", False)
    predict_kwargs.setdefault("convert_to_numpy", True)
    out = model.predict([tuple(p) for p in pairs], **predict_kwargs)
    return np.asarray(out, dtype=np.float32)


def classifier_logits(path: str, inputs: Iterable[str | Sequence[str]]) -> np.ndarray:
    """Raw logits [n, num_labels] of transformers AutoModelForSequenceClassification, ONE UNPADDED input at a time
    (a str, or a (text_a, text_b) pair), truncated to the tokenizer's model_max_length."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for item in inputs:
            args = (item,) if isinstance(item, str) else tuple(item)
            enc = tokenizer(*args, return_tensors="pt", truncation=True, max_length=tokenizer.model_max_length)
            out.append(model(**enc).logits[0])
    return torch.stack(out).numpy().astype(np.float32)


def _probs(path: str, logits: np.ndarray) -> np.ndarray:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    t = torch.from_numpy(logits)
    if cfg.get("problem_type") == "multi_label_classification" or t.shape[-1] == 1:
        return torch.sigmoid(t).numpy()
    return torch.softmax(t, dim=-1).numpy()


def classifier_probs(path: str, texts: Iterable[str]) -> np.ndarray:
    """[n, num_labels] float32: softmax over the labels, or per-label sigmoid when config.problem_type is
    "multi_label_classification" or there is one label (the text-classification pipeline's default)."""
    return _probs(path, classifier_logits(path, list(texts)))


def classifier_pair_probs(path: str, pairs: Iterable[Sequence[str]]) -> np.ndarray:
    """classifier_probs for (text_a, text_b) pairs (encoded as the tokenizer's pair template)."""
    return _probs(path, classifier_logits(path, [tuple(p) for p in pairs]))


def format_qwen3_reranker_pair(query: str, doc: str, instruction: str | None = None) -> str:
    """The model card's format_instruction."""
    if instruction is None:
        instruction = QWEN3_RERANKER_DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


def qwen3_reranker_input_ids(tokenizer, query: str, documents: Sequence[str], instruction: str | None = None,
                             max_length: int | None = None) -> list[list[int]]:
    """The model card's process_inputs, before padding: one id list per document."""
    if max_length is None:
        max_length = tokenizer.model_max_length
    prefix_tokens = tokenizer.encode(QWEN3_RERANKER_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(QWEN3_RERANKER_SUFFIX, add_special_tokens=False)
    pairs = [format_qwen3_reranker_pair(query, doc, instruction) for doc in documents]
    inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
    return [prefix_tokens + list(ids) + suffix_tokens for ids in inputs["input_ids"]]


def qwen3_reranker_scores(path: str, query: str, documents: Sequence[str], instruction: str | None = None,
                          max_length: int | None = None) -> np.ndarray:
    """Qwen3-Reranker model card recipe, one unpadded sequence at a time: softmax([logit_no, logit_yes])[1] at the
    last position, float32 [n]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    scores = []
    with torch.no_grad():
        for ids in qwen3_reranker_input_ids(tokenizer, query, documents, instruction, max_length):
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1, :]
            pair = torch.stack([logits[:, token_false_id], logits[:, token_true_id]], dim=1)
            scores.append(torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp()[0])
    return torch.stack(scores).numpy().astype(np.float32) if scores else np.zeros(0, dtype=np.float32)
