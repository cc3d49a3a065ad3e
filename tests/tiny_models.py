"""Tiny RANDOM sentence-transformers checkpoints, built locally, for comparing the server with `SentenceTransformer`.

Every `make_*` factory writes a complete sentence-transformers model directory into `path` and returns `path`:

    config.json + model.safetensors (or shards + model.safetensors.index.json)   -- transformers checkpoint, float32
    tokenizer.json + tokenizer_config.json                                         -- tiny `tokenizers` tokenizer
    modules.json, 1_Pooling/config.json, 2_Normalize/, sentence_bert_config.json,
    config_sentence_transformers.json                                              -- sentence-transformers files

Nothing touches the network. Everything is deterministic given `seed`, also across processes (the tokenizers come
from a fixed built-in corpus, the weights from `torch.manual_seed(seed)` and a seeded generator).

Weights are drawn with a LARGE std (default 0.2, norm weights 1 +- 0.2, every bias non-zero) instead of the usual
0.02, so that implementation mistakes (wrong causality, a dropped bias, a wrong rotary layout, a wrong norm) give
large differences rather than 1e-4-sized ones.

Sizes: MAX_SEQ_LENGTH = 256 (sentence_bert_config max_seq_length, tokenizer model_max_length, BERT
max_position_embeddings; XLM-R has 258 positions because of its padding_idx offset). 128 was too short: with a
~500-entry tokenizer a 60-word text plus an instruction prompt takes up to ~170 tokens. Every MIXED_TEXTS entry plus
any of the prompts fits (checked by the tests); use LONG_TEXT to exercise truncation.

Tokenizers (all `PreTrainedTokenizerFast`, saved with save_pretrained as tokenizer.json + tokenizer_config.json with
"tokenizer_class": "TokenizersBackend", which AutoTokenizer / sentence-transformers load verbatim)
--------------------------------------------------------------------------------------------------------------------
* decoder flavour (`build_decoder_tokenizer`): byte-level BPE trained with `tokenizers` (500 entries, so no text is
  ever <unk>), then the special tokens appended at the END of the vocabulary like Qwen's: <|endoftext|>=500,
  <|im_start|>=501, <|im_end|>=502. No BOS by default (bos_token_id None). A `TemplateProcessing` post-processor
  APPENDS <|endoftext|> to every sequence (gte-Qwen2 / Qwen3-Embedding behaviour: last-token pooling pools on that
  EOS). pad_token == eos_token == "<|endoftext|>".
* BERT flavour (`build_bert_tokenizer`): uncased WordPiece (BertNormalizer strips accents: "naïve" -> "naive"),
  `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]` with token type ids, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, 450 entries.
* XLM-R flavour (`build_xlmr_tokenizer`): Unigram + Metaspace ("\u2581"), NFKC, `<s> a </s>` / `<s> a </s></s> b </s>`,
  <s>=0 <pad>=1 </s>=2 <unk>=3, <mask>=450 (last); XLM-RoBERTa's padding_idx=1 matters for its position ids.
  The WordPiece and Unigram vocabularies are built directly (characters + most frequent words of the corpus) instead
  of with the `tokenizers` trainers, whose output changes from process to process (Rust HashMap order decides ties).

The factories size model vocabularies so that 4 does NOT divide them (1003 for decoders, 501 for encoders), to exercise
vocab-parallel padding; the tokenizer vocab is smaller than the model vocab (as with real Qwen checkpoints).

Common factory kwargs: `seed`, `std` (init scale), sizes, `vocab_size`, `max_seq_length`, `prompts` (dict for
config_sentence_transformers.json), `pooling` ("lasttoken" | "cls" | "mean", written in the legacy
`pooling_mode_*` form), `normalize` (include the Normalize module); decoders also take `padding_side` (saved in
tokenizer_config.json) and `legacy_config` (pre-v5 spelling: top-level "rope_theta", "torch_dtype"); make_mistral takes
`max_shard_size` (e.g. "20KB" -> sharded checkpoint + model.safetensors.index.json); encoders take `with_prefix`
(`bert.` / `roberta.` prefixed *ForMaskedLM-style checkpoint) and `with_pooler`.

`is_causal: false` (gte-Qwen2 style) in transformers 5.24
-------------------------------------------------------------
transformers 5.24 HONOURS `"is_causal": false` in config.json for Qwen2 (and every model whose forward goes through
`merge_with_config_defaults` + `create_causal_mask`), for both the "sdpa" and "eager" attention implementations:

* `transformers/utils/generic.py` lines 1162-1170 (`merge_with_config_defaults`, which decorates `Qwen2Model.forward`):
  reads `kwargs.get("is_causal", config.is_causal)`, writes it into `self.config.is_causal` for the duration of the
  call and forwards `is_causal=<value>` as a kwarg down to every attention layer.
* `transformers/masking_utils.py` lines 942-953 (`create_causal_mask`): "Power feature: if `is_causal` is False, then
  fallback to bi-directional mask" -> returns `create_bidirectional_mask(...)` (only padding is masked; with no padding
  and sdpa the mask is `None`).
* `transformers/integrations/sdpa_attention.py` lines 132 and 148: `is_causal = is_causal if is_causal is not None else
  module.is_causal`, then `is_causal = q_length > 1 and attention_mask is None and is_causal`. The hard-coded
  `Qwen2Attention.is_causal = True` (`models/qwen2/modeling_qwen2.py` line 180) is therefore overridden by the kwarg,
  so even the mask-less (no padding) sdpa path runs bidirectionally.

So `SentenceTransformer(dir)` / `AutoModel.from_pretrained(dir)` on `make_qwen2_bidirectional` output DO run
bidirectional attention (verified in tests/test_tiny_models.py against `reference_embeddings_bidirectional`, which does
not rely on any of that machinery: it passes an explicit all-visible 4D additive mask, one unpadded text at a time).
`reference_embeddings_causal` passes an explicit causal 4D mask, so a test can show the two differ. Note also that
`model(..., is_causal=True)` as a forward kwarg overrides the config at call time (generic.py line 1163).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = [
    "MIXED_TEXTS",
    "LONG_TEXT",
    "QUERY_PROMPT",
    "QWEN3_QUERY_PROMPT",
    "GTE_QWEN2_QUERY_PROMPT",
    "build_decoder_tokenizer",
    "build_bert_tokenizer",
    "build_xlmr_tokenizer",
    "make_mistral",
    "make_qwen2_bidirectional",
    "make_qwen3",
    "make_bert",
    "make_xlm_roberta",
    "st_encode",
    "transformers_embeddings",
    "reference_embeddings_bidirectional",
    "reference_embeddings_causal",
    "safetensors_keys",
]

DEFAULT_STD = 0.2
MAX_SEQ_LENGTH = 256
DECODER_VOCAB_SIZE = 1003  # 4 does not divide it (1003 = 17 * 59)
ENCODER_VOCAB_SIZE = 501  # 4 does not divide it

QUERY_PROMPT = "Instruct: Given a query, retrieve passages\nQuery: "
GTE_QWEN2_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
QWEN3_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"

# ---------------------------------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------------------------------

# >= 16 texts of very mixed lengths (1 word .. ~60 words), some non-ASCII. Every one, with any of the prompts above,
# fits in MAX_SEQ_LENGTH tokens for every tiny tokenizer (checked by tests/test_tiny_models.py).
MIXED_TEXTS: list[str] = [
    "hello",
    "Paris",
    "naïve café",
    "日本語のテキスト",
    "What is the capital of France?",
    "I love pizza 🍕 and ice cream 🍦!",
    "The quick brown fox jumps over the lazy dog.",
    "Straße, Ærø, São Paulo, Zürich and Kraków are places.",
    "Привет, как дела? Всё хорошо.",
    "Tensor parallelism splits every weight matrix across several GPUs.",
    "A B C",
    "The mitochondria is the powerhouse of the cell, and it produces most of the chemical energy needed to "
    "power the biochemical reactions of the cell.",
    "def add(a, b):\n    return a + b",
    "Embeddings map sentences to vectors; similar sentences end up close together, so a search engine can "
    "retrieve relevant passages for a query by comparing vectors with the cosine similarity.",
    "¿Dónde está la biblioteca? 🤔",
    "The history of the city goes back more than two thousand years. It was founded on a small island in the "
    "river, grew into a busy market town, survived fires, floods and wars, and today it is home to museums, "
    "parks, old bridges and a famous cathedral that attracts millions of visitors from all over the world "
    "every single year.",
    "Numbers: 3.14159, 2.71828, 42, 1e-9 and 100%.",
    "Short one.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "北京是中国的首都。",
]

_ENGLISH_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
To be or not to be, that is the question. All that glitters is not gold. Knowledge is power.
Machine learning models learn patterns from data. A neural network is made of layers of neurons.
Transformers use attention to mix information between the tokens of a sentence.
The encoder reads the whole sentence at once, while a decoder reads it from left to right.
Sentence embeddings are vectors that capture the meaning of a text. Similar texts have similar embeddings.
Search engines retrieve documents that are relevant to the query of the user.
Given a web search query, retrieve relevant passages that answer the query.
Instruct: Given a query, retrieve passages. Query: what is the weather like today?
The weather today is sunny with a light breeze and a few clouds in the afternoon.
Paris is the capital of France, Berlin is the capital of Germany, and Rome is the capital of Italy.
Water boils at one hundred degrees Celsius at sea level. The sun rises in the east and sets in the west.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
Please send the report before the meeting on Monday morning, and bring the slides with you.
The library opens at nine o'clock and closes at six o'clock in the evening.
Cats and dogs are the most popular pets in many countries around the world.
A server receives requests, runs the model on a batch of inputs and returns the results.
Tensor parallel inference splits the attention heads and the feed forward layers across devices.
Every rank holds a shard of the weights, and an all reduce sums the partial results.
The tokenizer turns text into token ids; the model turns token ids into hidden states.
Python is a programming language. def main(): print("hello world") return 0
Numbers like 1, 2, 3, 10, 100, 1000, 3.14 and 2.5% appear in many documents.
He said: "I will be there at 5 pm, don't worry!" and then he left (quickly).
"""

_NON_ASCII_CORPUS = """
naïve café résumé déjà vu façade coöperate jalapeño piñata crème brûlée
Straße Müller Größe Übung schön Ærø Kraków Zürich São Paulo
日本語のテキストです。東京は日本の首都です。こんにちは世界。
北京是中国的首都。我喜欢学习语言。你好世界。
Привет, как дела? Всё хорошо, спасибо. Москва
¿Dónde está la biblioteca? Él habla español muy bien. ¡Hola!
emoji: 🍕 🍦 🤔 😀 🚀 ❤️ 👍 🎉
Ελληνικά γράμματα: α β γ δ ε. العربية. हिन्दी. 한국어 텍스트.
"""

# Longer than MAX_SEQ_LENGTH tokens for every tiny tokenizer (~350 words, 900+ tokens): for truncation tests.
LONG_TEXT = " ".join(_ENGLISH_CORPUS.split())


def _training_corpus() -> list[str]:
    base = [ln for ln in (_ENGLISH_CORPUS + _NON_ASCII_CORPUS).splitlines() if ln.strip()]
    # The test texts and prompts weigh more, so that their words get merged into few tokens (short sequences).
    return base + (MIXED_TEXTS + [QUERY_PROMPT, GTE_QWEN2_QUERY_PROMPT, QWEN3_QUERY_PROMPT]) * 5


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------

def _wrap(tok, model_max_length: int, padding_side: str, **special):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        **special,
    )
    return hf


def _word_counts(normalizer, pre_tokenizer) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in _training_corpus():
        text = normalizer.normalize_str(line) if normalizer is not None else line
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(text))
    return counts


def _top_words(counts, exclude: set[str], n: int) -> list[str]:
    """The n most frequent multi-character words, ties broken alphabetically (fully deterministic)."""
    words = sorted((w for w in counts if len(w) > 1 and w not in exclude), key=lambda w: (-counts[w], w))
    return words[:max(n, 0)]


def train_byte_level_bpe(corpus: list[str], vocab_size: int):
    """A `tokenizers` byte-level BPE (Qwen's pre-tokenizer and decoder) trained on `corpus`, before any special
    token or post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_decoder_tokenizer(
    vocab_size: int = 500,
    model_max_length: int = MAX_SEQ_LENGTH,
    padding_side: str = "right",
    bos_token: str | None = None,
    append_eos: bool = True,
):
    """Byte-level BPE tokenizer, Qwen style (`PreTrainedTokenizerFast`).

    Specials are appended after the trained vocabulary: "<|endoftext|>" (eos = pad), "<|im_start|>", "<|im_end|>" and,
    if `bos_token` is given, that token too (then prepended to every sequence). With `append_eos` (default) a
    post-processor appends "<|endoftext|>" to every sequence (also in pairs), like gte-Qwen2 / Qwen3-Embedding.
    """
    from tokenizers import processors

    tok = train_byte_level_bpe(_training_corpus(), vocab_size)
    eos = "<|endoftext|>"
    specials = [eos, "<|im_start|>", "<|im_end|>"] + ([bos_token] if bos_token else [])
    tok.add_special_tokens(specials)
    eos_id = tok.token_to_id(eos)
    bos_id = tok.token_to_id(bos_token) if bos_token else None
    single, pair, sp = "$A", "$A:0 $B:1", []
    if bos_token:
        single, pair = f"{bos_token} {single}", f"{bos_token} $A:0 $B:1"
        sp.append((bos_token, bos_id))
    if append_eos:
        single += f" {eos}"
        pair = pair.replace("$A:0", f"$A:0 {eos}:0") + f" {eos}:1"
        sp.append((eos, eos_id))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=sp)
    special = dict(eos_token=eos, pad_token=eos, additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                   model_input_names=["input_ids", "attention_mask"])
    if bos_token:
        special["bos_token"] = bos_token
    return _wrap(tok, model_max_length, padding_side, **special)


def build_bert_tokenizer(vocab_size: int = 450, model_max_length: int = MAX_SEQ_LENGTH):
    """Uncased WordPiece, BERT style: `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]` with token types;
    [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The WordPiece trainer is not deterministic across processes (its tie-breaking follows Rust HashMap order), so the
    # vocabulary is built here: specials, every character of the corpus (word-initial and "##"), then the most
    # frequent whole words.
    counts = _word_counts(normalizer, pre_tokenizer)
    chars = sorted({c for w in counts for c in w})
    vocab = specials + chars + ["##" + c for c in chars]
    vocab += _top_words(counts, set(vocab), vocab_size - len(vocab))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return _wrap(
        tok, model_max_length, "right",
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def build_xlmr_tokenizer(vocab_size: int = 450, model_max_length: int = MAX_SEQ_LENGTH):
    """Unigram + Metaspace ("▁"), XLM-R style: `<s> a </s>` / `<s> a </s></s> b </s>`;
    <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> = last id."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    normalizer = normalizers.NFKC()
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    # Built here rather than with UnigramTrainer, whose scores/pieces vary between processes: specials, every character,
    # then the most frequent whole words ("\u2581word"); scores = log frequencies (characters below every word).
    counts = _word_counts(normalizer, pre_tokenizer)
    total = sum(counts.values())
    chars = sorted({c for w in counts for c in w})
    char_score = round(math.log(1.0 / total) - 2.0, 6)
    pieces = [(t, 0.0) for t in specials] + [(c, char_score) for c in chars]
    words = _top_words(counts, set(chars), vocab_size - len(pieces))
    pieces += [(w, round(math.log(counts[w] / total), 6)) for w in words]
    tok = Tokenizer(models.Unigram(pieces, unk_id=specials.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens(["<mask>"])
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return _wrap(
        tok, model_max_length, "right",
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", model_input_names=["input_ids", "attention_mask"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Weights and files
# ---------------------------------------------------------------------------------------------------------------------

def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Every parameter ~ N(0, std); norm weights ~ 1 + N(0, std), norm biases ~ N(0, std). Deterministic order."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for _, module in model.named_modules():
            is_norm = isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
                if is_norm and pname == "weight":
                    p.copy_(1.0 + noise)
                else:
                    p.copy_(noise)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_st_files(
    path: str,
    hidden_size: int,
    pooling: str,
    max_seq_length: int,
    prompts: dict | None,
    normalize: bool = True,
    default_prompt_name: str | None = None,
) -> None:
    if pooling not in ("lasttoken", "cls", "mean"):
        raise ValueError(f"pooling must be lasttoken, cls or mean, not {pooling!r}")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    _write_json(os.path.join(path, "modules.json"), modules)
    _write_json(os.path.join(path, "1_Pooling", "config.json"), {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken",
        "include_prompt": True,
    })
    _write_json(os.path.join(path, "sentence_bert_config.json"),
                {"max_seq_length": max_seq_length, "do_lower_case": False})
    import sentence_transformers
    import transformers

    _write_json(os.path.join(path, "config_sentence_transformers.json"), {
        "__version__": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
        },
        "prompts": dict(prompts or {}),
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
        "model_type": "SentenceTransformer",
    })


def _save(model, tokenizer, path: str, max_shard_size: str | int | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)


def _prefix_checkpoint(path: str, prefix: str, extra: dict[str, torch.Tensor], architectures: list[str]) -> None:
    """Rewrite model.safetensors so every key carries `prefix` and add `extra` (unprefixed-name) tensors."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    new = {(k if k.startswith(prefix) else prefix + k): v for k, v in state.items()}
    new.update(extra)
    save_file({k: v.contiguous() for k, v in sorted(new.items())}, file, metadata={"format": "pt"})
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["architectures"] = architectures
    _write_json(cfg_file, cfg)


def mlm_head_tensors(prefix: str, dense: str, norm: str, vocab_size: int, hidden: int, seed: int,
                     std: float) -> dict[str, torch.Tensor]:
    """Random tensors of a masked-LM head (an output bias, a dense layer and a LayerNorm) under `prefix`, for a
    *ForMaskedLM checkpoint whose head the engine must skip."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}bias": torch.randn(vocab_size, generator=gen) * std,
        f"{prefix}{dense}weight": torch.randn(hidden, hidden, generator=gen) * std,
        f"{prefix}{dense}bias": torch.randn(hidden, generator=gen) * std,
        f"{prefix}{norm}weight": 1 + torch.randn(hidden, generator=gen) * std,
        f"{prefix}{norm}bias": torch.randn(hidden, generator=gen) * std,
    }


def _legacy_config(path: str) -> None:
    """Rewrite config.json the way pre-v5 checkpoints (e5-mistral, gte-Qwen2, Qwen3-Embedding) spell it:
    top-level "rope_theta" instead of "rope_parameters", "torch_dtype" instead of "dtype"."""
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    _write_json(cfg_file, dict(sorted(cfg.items())))


def safetensors_keys(path: str) -> list[str]:
    """Sorted tensor names over model.safetensors or all shards listed in model.safetensors.index.json."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    keys: list[str] = []
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            keys.extend(f.keys())
    return sorted(keys)


# ---------------------------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------------------------

def make_mistral(
    path: str,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 4,
    num_hidden_layers: int = 2,
    intermediate_size: int = 96,
    vocab_size: int = DECODER_VOCAB_SIZE,
    rope_theta: float = 10000.0,
    max_seq_length: int = MAX_SEQ_LENGTH,
    prompts: dict | None = None,
    padding_side: str = "right",
    max_shard_size: str | int | None = None,
    legacy_config: bool = False,
    pooling: str = "lasttoken",
    normalize: bool = True,
    std: float = DEFAULT_STD,
) -> str:
    """e5-mistral style: MistralForCausalLM (keys `model.*` + `lm_head.weight`), GQA 8 q / 4 kv heads of dim 8,
    last-token pooling + Normalize, prompts {"query": QUERY_PROMPT}. Decoder-flavour tokenizer (EOS appended, no BOS).

    `max_shard_size` (e.g. "20KB") produces a sharded checkpoint with model.safetensors.index.json
    (transformers 5.24's save_pretrained still accepts it)."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = build_decoder_tokenizer(model_max_length=max_seq_length, padding_side=padding_side)
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).eval()
    _randomize(model, seed, std)
    _save(model, tokenizer, path, max_shard_size)
    if legacy_config:
        _legacy_config(path)
    _write_st_files(path, hidden_size, pooling, max_seq_length,
                    {"query": QUERY_PROMPT} if prompts is None else prompts, normalize=normalize)
    return path


def make_qwen2_bidirectional(
    path: str,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 1,
    num_hidden_layers: int = 2,
    intermediate_size: int = 96,
    vocab_size: int = DECODER_VOCAB_SIZE,
    rope_theta: float = 1000000.0,
    is_causal: bool = False,
    max_seq_length: int = MAX_SEQ_LENGTH,
    prompts: dict | None = None,
    padding_side: str = "right",
    legacy_config: bool = False,
    pooling: str = "lasttoken",
    normalize: bool = True,
    std: float = DEFAULT_STD,
) -> str:
    """gte-Qwen2 style: Qwen2ForCausalLM with `"is_causal": false` in config.json, q/k/v biases, 4 q heads / 1 kv head
    (head_dim 16), untied lm_head, last-token pooling + Normalize. See the module docstring: transformers 5.24 honours
    is_causal=false, so SentenceTransformer(path) runs bidirectional attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_decoder_tokenizer(model_max_length=max_seq_length, padding_side=padding_side)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        is_causal=is_causal,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    _randomize(model, seed, std)
    _save(model, tokenizer, path)
    # Make sure the flag is in config.json whatever transformers decides to serialise.
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["is_causal"] = is_causal
    _write_json(cfg_file, cfg)
    if legacy_config:
        _legacy_config(path)
    _write_st_files(path, hidden_size, pooling, max_seq_length,
                    {"query": GTE_QWEN2_QUERY_PROMPT} if prompts is None else prompts, normalize=normalize)
    return path


def make_qwen3(
    path: str,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 32,
    num_hidden_layers: int = 2,
    intermediate_size: int = 96,
    vocab_size: int = DECODER_VOCAB_SIZE,
    rope_theta: float = 1000000.0,
    tie_word_embeddings: bool = True,
    max_seq_length: int = MAX_SEQ_LENGTH,
    prompts: dict | None = None,
    padding_side: str = "left",
    legacy_config: bool = False,
    pooling: str = "lasttoken",
    normalize: bool = True,
    std: float = DEFAULT_STD,
) -> str:
    """Qwen3-Embedding style: Qwen3ForCausalLM with q/k RMSNorm, head_dim 32 != hidden/heads (64/4), 4 q / 2 kv heads,
    no attention bias, tied embeddings (so there is NO `lm_head.weight` in the safetensors), last-token pooling +
    Normalize, prompts {"query": QWEN3_QUERY_PROMPT}, left padding like Qwen3-Embedding's tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_decoder_tokenizer(model_max_length=max_seq_length, padding_side=padding_side)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        attention_bias=False,
        use_sliding_window=False,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    _randomize(model, seed, std)
    _save(model, tokenizer, path)
    if legacy_config:
        _legacy_config(path)
    if prompts is None:
        prompts = {"query": QWEN3_QUERY_PROMPT, "document": ""}
    _write_st_files(path, hidden_size, pooling, max_seq_length, prompts, normalize=normalize)
    return path


def bert_config(**kw):
    """BertConfig of the tiny BERT layout (GELU, two token types, [PAD]=0, float32); `kw` sets the sizes."""
    from transformers import BertConfig

    return BertConfig(**{"hidden_act": "gelu", "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
                         "dtype": "float32", **kw})


def xlmr_config(max_seq_length: int, **kw):
    """XLMRobertaConfig of the tiny XLM-R layout: <pad>=1, so positions start at 2 and there are max_seq_length + 2
    of them; one token type; float32."""
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(**{"hidden_act": "gelu", "max_position_embeddings": max_seq_length + 2,
                               "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0,
                               "eos_token_id": 2, "dtype": "float32", **kw})


def build_and_save(build, tokenizer, path: str, seed: int, std: float):
    """build() under torch.manual_seed(seed), in eval mode, randomized with `std` and saved with the tokenizer."""
    torch.manual_seed(seed)
    model = build().eval()
    _randomize(model, seed, std)
    _save(model, tokenizer, path)
    return model


def make_bert(
    path: str,
    with_prefix: bool = False,
    seed: int = 0,
    *,
    with_pooler: bool = True,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = ENCODER_VOCAB_SIZE,
    max_position_embeddings: int = MAX_SEQ_LENGTH,
    max_seq_length: int = MAX_SEQ_LENGTH,
    prompts: dict | None = None,
    pooling: str = "cls",
    normalize: bool = True,
    std: float = DEFAULT_STD,
) -> str:
    """BGE style: BertModel, CLS pooling + Normalize, uncased WordPiece tokenizer ([PAD]=0).

    Default: keys as BertModel saves them (`embeddings.*`, `encoder.layer.*`, `pooler.dense.*` -- the pooler is unused
    by CLS pooling, as in BGE checkpoints; `with_pooler=False` leaves it out).
    `with_prefix=True`: BertForMaskedLM-style checkpoint: every key prefixed `bert.`, plus `cls.predictions.*`
    MLM-head tensors (to be ignored); config.json "architectures" = ["BertForMaskedLM"]."""
    from transformers import BertModel

    tokenizer = build_bert_tokenizer(model_max_length=max_seq_length)
    config = bert_config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings)
    build_and_save(lambda: BertModel(config, add_pooling_layer=with_pooler), tokenizer, path, seed, std)
    if with_prefix:
        extra = mlm_head_tensors("cls.predictions.", "transform.dense.", "transform.LayerNorm.", vocab_size,
                                 hidden_size, seed + 1, std)
        _prefix_checkpoint(path, "bert.", extra, ["BertForMaskedLM"])
    _write_st_files(path, hidden_size, pooling, max_seq_length, prompts, normalize=normalize)
    return path


def make_xlm_roberta(
    path: str,
    with_prefix: bool = False,
    seed: int = 0,
    *,
    with_pooler: bool = True,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = ENCODER_VOCAB_SIZE,
    max_seq_length: int = MAX_SEQ_LENGTH,
    prompts: dict | None = None,
    pooling: str = "cls",
    normalize: bool = True,
    std: float = DEFAULT_STD,
) -> str:
    """bge-m3 style: XLMRobertaModel, pad_token_id=1 (positions start at padding_idx + 1 = 2, so
    max_position_embeddings = max_seq_length + 2), type_vocab_size 1, CLS pooling + Normalize.

    Keys as XLMRobertaModel saves them (`embeddings.*`, `encoder.layer.*`, `pooler.dense.*` unless with_pooler=False).
    `with_prefix=True`: XLMRobertaForMaskedLM-style checkpoint: keys prefixed `roberta.`, plus `lm_head.*` tensors
    (to be ignored); "architectures" = ["XLMRobertaForMaskedLM"]."""
    from transformers import XLMRobertaModel

    tokenizer = build_xlmr_tokenizer(model_max_length=max_seq_length)
    config = xlmr_config(max_seq_length, vocab_size=vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         intermediate_size=intermediate_size)
    build_and_save(lambda: XLMRobertaModel(config, add_pooling_layer=with_pooler), tokenizer, path, seed, std)
    if with_prefix:
        gen = torch.Generator().manual_seed(seed + 1)
        h = hidden_size
        extra = {
            "lm_head.bias": torch.randn(vocab_size, generator=gen) * std,
            "lm_head.dense.weight": torch.randn(h, h, generator=gen) * std,
            "lm_head.dense.bias": torch.randn(h, generator=gen) * std,
            "lm_head.layer_norm.weight": 1 + torch.randn(h, generator=gen) * std,
            "lm_head.layer_norm.bias": torch.randn(h, generator=gen) * std,
        }
        _prefix_checkpoint(path, "roberta.", extra, ["XLMRobertaForMaskedLM"])
    _write_st_files(path, hidden_size, pooling, max_seq_length, prompts, normalize=normalize)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Reference encoders
# ---------------------------------------------------------------------------------------------------------------------

def st_encode(path: str, texts: Sequence[str] | str, **kw) -> np.ndarray:
    """`SentenceTransformer(path, device="cpu").encode(texts, normalize_embeddings=True, **kw)` as float32 numpy
    (2D even for a single string). kw go to `encode` (prompt_name=, prompt=, batch_size=, truncate_dim=, ...)."""
    from sentence_transformers import SentenceTransformer

    if isinstance(texts, str):
        texts = [texts]
    model = SentenceTransformer(path, device="cpu", local_files_only=True)
    kw.setdefault("normalize_embeddings", True)
    kw.setdefault("convert_to_numpy", True)
    kw.setdefault("show_progress_bar", False)
    out = model.encode(list(texts), **kw)
    return np.asarray(out, dtype=np.float32)


def _pooling_mode(path: str) -> str:
    with open(os.path.join(path, "1_Pooling", "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("pooling_mode_lasttoken"):
        return "lasttoken"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    raise ValueError(f"unsupported pooling config {cfg}")


def _max_seq_length(path: str) -> int:
    with open(os.path.join(path, "sentence_bert_config.json"), encoding="utf-8") as f:
        return int(json.load(f)["max_seq_length"])


def transformers_embeddings(
    path: str,
    texts: Iterable[str],
    prompt: str | None = None,
    attention: str = "config",
    normalize: bool = True,
    attn_implementation: str = "eager",
) -> np.ndarray:
    """Independent reference: plain transformers AutoModel, ONE UNPADDED TEXT AT A TIME, pooling read from
    1_Pooling/config.json (lasttoken / cls / mean), truncation at sentence_bert_config's max_seq_length.

    attention: "config"        -> whatever the model/config does by default (2D all-ones attention_mask);
               "bidirectional" -> explicit 4D additive mask of zeros (every token sees every token);
               "causal"        -> explicit 4D additive causal mask.
    The explicit 4D masks bypass transformers' mask construction (create_causal_mask returns a 4D mask as-is)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation,
                                      dtype=torch.float32).eval()
    pooling, max_len = _pooling_mode(path), _max_seq_length(path)
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer((prompt or "") + text, return_tensors="pt", truncation=True, max_length=max_len)
            ids = enc["input_ids"]
            n = ids.shape[1]
            if attention == "config":
                mask = enc["attention_mask"]
            elif attention in ("bidirectional", "causal"):
                mask = torch.zeros(1, 1, n, n, dtype=torch.float32)
                if attention == "causal":
                    mask = mask.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
            else:
                raise ValueError(attention)
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in enc:
                kwargs["token_type_ids"] = enc["token_type_ids"]
            hidden = model(**kwargs).last_hidden_state[0]
            if pooling == "lasttoken":
                vec = hidden[-1]
            elif pooling == "cls":
                vec = hidden[0]
            else:
                vec = hidden.mean(0)
            out.append(vec)
    emb = torch.stack(out)
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb.numpy().astype(np.float32)


def reference_embeddings_bidirectional(path: str, texts: Iterable[str], prompt: str | None = None) -> np.ndarray:
    """Last-token (per the pooling config) normalized embeddings with FULL non-causal attention, forced through an
    explicit 4D all-zeros additive mask, one unpadded text at a time (eager attention). Does not depend on transformers
    honouring `is_causal: false` -- which 5.24 does (see module docstring), so this equals st_encode(path, texts)."""
    return transformers_embeddings(path, texts, prompt=prompt, attention="bidirectional")


def reference_embeddings_causal(path: str, texts: Iterable[str], prompt: str | None = None) -> np.ndarray:
    """Same as reference_embeddings_bidirectional but with an explicit causal 4D mask (what a loader that ignores
    `is_causal: false` would compute). Differs from the bidirectional result by O(1) on the tiny random models."""
    return transformers_embeddings(path, texts, prompt=prompt, attention="causal")


def add_dense_module(path: str, out_features: int, activation: str = "tanh", seed: int = 0) -> str:
    """Insert a sentence-transformers `Dense` module (random weights, std 0.2 scaled, with bias) after the Pooling
    module of the model directory `path`, before any Normalize, as sentence-transformers saves one: a folder
    `2_Dense` with config.json and model.safetensors. activation: "tanh" or "identity" (stella-style
    projections). Returns `path`."""
    from sentence_transformers.models import Dense

    modules = json.load(open(os.path.join(path, "modules.json")))
    pooling = next(m for m in modules if m["type"].endswith("Pooling"))
    in_features = json.load(open(os.path.join(path, pooling["path"], "config.json")))["word_embedding_dimension"]
    torch.manual_seed(seed)
    act = torch.nn.Tanh() if activation == "tanh" else torch.nn.Identity()
    dense = Dense(in_features, out_features, bias=True, activation_function=act)
    with torch.no_grad():
        dense.linear.weight.normal_(0, 1.0 / math.sqrt(in_features))
        dense.linear.bias.normal_(0, 0.2)
    os.makedirs(os.path.join(path, "2_Dense"), exist_ok=True)
    dense.save(os.path.join(path, "2_Dense"))
    at = modules.index(pooling) + 1
    modules.insert(at, {"idx": at, "name": str(at), "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    for i, m in enumerate(modules):
        m["idx"], m["name"] = i, str(i)
    _write_json(os.path.join(path, "modules.json"), modules)
    return path
