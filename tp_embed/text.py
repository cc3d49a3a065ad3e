"""Rank 0's text side: the model's tokenizer, its context length and sentence-transformers' named prompts.

Lives apart from the engine so that model families (CLIP tokenizes its text items, GME checks its
rendered prompts' lengths) use it without importing the engine.
"""

import logging

from transformers import AutoTokenizer

from tp_embed.config import SentenceTransformersConfig
from tp_embed.errors import ConfigError

logger = logging.getLogger("tp_embed")


class InputTooLongError(ValueError):
    def __init__(self, index: int, num_tokens: int, limit: int):
        self.index, self.num_tokens, self.limit = index, num_tokens, limit
        super().__init__(f"input {index} has {num_tokens} tokens, more than this model's context length of "
                         f"{limit} tokens; shorten it or ask for truncation (`truncate: true` or "
                         f"--allow-auto-truncate)")


class TextProcessor:
    """The model's own tokenizer as configured (its special tokens, e.g. the EOS that gte-Qwen2 and
    Qwen3-Embedding pool on), the context length and the sentence-transformers prompts.

    `max_input_tokens` is the model's position limit; the context length is --context-length (at most
    that), else sentence-transformers' max_seq_length, else the tokenizer's model_max_length, else the limit.
    """

    def __init__(self, model_dir: str, st: SentenceTransformersConfig, max_input_tokens: int,
                 context_length: int | None = None, trust_remote_code: bool = False):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if not self.tokenizer.is_fast:
            logger.warning("%s has no fast tokenizer; tokenization will be slow", model_dir)
        limit = max_input_tokens
        if context_length is not None:
            if context_length > limit:
                raise ConfigError(f"--context-length {context_length} exceeds the model's position limit {limit}")
            self.max_length = context_length
        elif st.max_seq_length:
            self.max_length = min(st.max_seq_length, limit)
        elif 0 < getattr(self.tokenizer, "model_max_length", 0) < 10 ** 7:
            self.max_length = min(self.tokenizer.model_max_length, limit)
        else:
            self.max_length = limit
        self.prompts = dict(st.prompts)
        self.default_prompt_name = st.default_prompt_name

    def prompt(self, name: str | None) -> str:
        name = name if name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise KeyError(f"unknown prompt_name {name!r}; this model's prompts: {known}")
        return self.prompts[name]

    def encode(self, texts: list[str], truncate: bool, prompt: str = "") -> list[list[int]]:
        """Token ids per text, with the tokenizer's special tokens; raises InputTooLongError."""
        if prompt:
            texts = [prompt + t for t in texts]
        if truncate:
            return self.tokenizer(texts, add_special_tokens=True, truncation=True,
                                  max_length=self.max_length)["input_ids"]
        # verbose=False: transformers would warn that an input over model_max_length "will result in indexing
        # errors"; check_lengths answers that with a 400 instead
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        self.check_lengths(ids)
        return ids

    def check_lengths(self, sequences: list[list[int]]) -> None:
        for i, s in enumerate(sequences):
            if len(s) > self.max_length:
                raise InputTooLongError(i, len(s), self.max_length)
