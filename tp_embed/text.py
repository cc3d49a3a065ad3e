"""Rank 0's text side: the model's tokenizer, its context length and sentence-transformers' named prompts.

Lives apart from the engine so that model families (CLIP tokenizes its text items, GME checks its
rendered prompts' lengths) use it without importing the engine.
"""

import logging
from dataclasses import dataclass

from transformers import AutoTokenizer

from tp_embed.config import SentenceTransformersConfig
from tp_embed.errors import ConfigError

logger = logging.getLogger("tp_embed")


class InputTooLongError(ValueError):
    def __init__(self, index: int, num_tokens: int, limit: int, message: str | None = None):
        self.index, self.num_tokens, self.limit = index, num_tokens, limit
        super().__init__(message or (
            f"input {index} has {num_tokens} tokens, more than this model's context length of {limit} tokens; "
            f"shorten it, or ask for truncation (`truncate: true`, `truncate_prompt_tokens`, --long-inputs "
            f"truncate) or for chunking (`long_inputs: \"chunk\"`, --long-inputs chunk)"))


@dataclass(frozen=True)
class LengthPolicy:
    """What to do with an input longer than `limit` tokens (None: the context length).

    error: refuse it (InputTooLongError). truncate: keep `limit` tokens, the beginning of the text ("right",
    cutting on the right) or its end ("left"). chunk: cut it into windows of `limit` tokens, each embedded on
    its own (pooling.combine_windows joins their vectors). Truncation and chunking keep the tokenizer's special
    tokens (the [CLS] and [SEP] of BERT, the EOS a decoder embedder pools on) and the prompt in every window,
    and cut only the text. An input over `max_input_tokens` is refused whatever the mode.
    """
    mode: str = "error"
    limit: int | None = None
    side: str = "right"
    max_input_tokens: int | None = None


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

    def encode_windows(self, texts: list[str], policy: LengthPolicy, prompt: str = "") -> list[list[list[int]]]:
        """Each text (after `prompt`) as the token sequences `policy` makes of it: one, or its windows
        (`fit`). Raises InputTooLongError, or ValueError when the limit leaves no room for the text."""
        full = [prompt + t for t in texts] if prompt else list(texts)
        ids = self.tokenizer(full, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [self.fit(i, seq, policy, full[i], len(prompt)) for i, seq in enumerate(ids)]

    def fit_token_ids(self, sequences: list[list[int]], policy: LengthPolicy) -> list[list[list[int]]]:
        """Token-id inputs as `policy` makes them (`fit`); the special tokens they hold are kept when cut."""
        return [self.fit(i, seq, policy) for i, seq in enumerate(sequences)]

    def fit(self, index: int, ids: list[int], policy: LengthPolicy, text: str | None = None,
            prompt_chars: int = 0) -> list[list[int]]:
        """One input's token ids (of `text`, whose first `prompt_chars` characters are the prompt, when
        given) -> the sequences to embed: [ids] when they fit, else cut as `policy` says."""
        limit = policy.limit or self.max_length
        if policy.max_input_tokens is not None and len(ids) > policy.max_input_tokens:
            raise InputTooLongError(index, len(ids), policy.max_input_tokens, (
                f"input {index} has {len(ids)} tokens, more than the {policy.max_input_tokens} tokens this server "
                f"takes in one input (--max-input-tokens)"))
        if len(ids) <= limit:
            return [ids]
        if policy.mode == "error":
            raise InputTooLongError(index, len(ids), limit, None if policy.limit is None else (
                f"input {index} has {len(ids)} tokens, more than the {limit} this request allows"))
        head, prompt, body, tail = self.split(ids, text, prompt_chars)
        room = limit - len(head) - len(prompt) - len(tail)
        if room < 1:
            raise ValueError(f"input {index}: a limit of {limit} tokens leaves no room for the text after its "
                             f"{len(head) + len(tail)} special and {len(prompt)} prompt tokens")
        if policy.mode == "truncate":
            kept = body[:room] if policy.side == "right" else body[len(body) - room:]
            return [head + prompt + kept + tail]
        return [head + prompt + body[j:j + room] + tail for j in range(0, len(body), room)]

    def split(self, ids: list[int], text: str | None, prompt_chars: int) -> tuple[list[int], ...]:
        """ids -> (leading special tokens, prompt tokens, the text's tokens, trailing special tokens). The prompt's
        tokens are those that start inside its characters, by the fast tokenizer's offsets (a token that spans
        the prompt's end belongs to the prompt)."""
        if text is not None:
            enc = self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False,
                                 return_special_tokens_mask=True, return_offsets_mapping=self.tokenizer.is_fast)
            special = enc["special_tokens_mask"]
        else:
            special = self.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
        start, end = 0, len(ids)
        while start < end and special[start]:
            start += 1
        while end > start and special[end - 1]:
            end -= 1
        num_prompt = 0
        if prompt_chars:
            if self.tokenizer.is_fast:
                offsets = enc["offset_mapping"]
                while start + num_prompt < end and offsets[start + num_prompt][0] < prompt_chars:
                    num_prompt += 1
            else:
                prompt_ids = self.tokenizer(text[:prompt_chars], add_special_tokens=False)["input_ids"]
                num_prompt = min(len(prompt_ids), end - start)
        middle = start + num_prompt
        return ids[:start], ids[start:middle], ids[middle:end], ids[end:]
