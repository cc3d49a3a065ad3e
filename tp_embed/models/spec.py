"""What a model family tells the rest of tp-embed about itself, and the narrow interface its
multimodal processor sees.

Every family module under `tp_embed/models/` ends in one `SPEC = ModelSpec(...)`; `tp_embed/models/__init__.py`
maps architecture names to specs with a plain dict. Nothing outside `models/` names a family: the engine
asks the spec (its config builder, model class, checkpoint layout, default pooling, processor, flags).
"""

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from tp_embed.batch import Batch
from tp_embed.config import EngineConfig, ModelConfig
from tp_embed.text import TextProcessor

# flags only some families take, and what to tell a user who gives one to a family that does not
FAMILY_FLAGS = {
    "chat_template": "use prompt_name for instructions",
    "pooling": "the model pools its own outputs",
}


@dataclass(frozen=True)
class CheckpointLayout:
    """How checkpoint keys become parameter names: strip the first matching prefix, skip ignored
    tensors, apply the renames (substring -> substring, in order), then map fused projections
    (checkpoint fragment -> (parameter fragment, shard id))."""
    strip_prefixes: tuple[str, ...] = ()
    ignored_prefixes: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    packed_modules: dict = field(default_factory=dict)

    def param_name(self, key: str) -> tuple[str, object] | None:
        """Checkpoint key -> (parameter name, shard id), or None for a tensor the model does not use."""
        for prefix in self.strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith(self.ignored_prefixes):
            return None
        for old, new in self.renames:
            key = key.replace(old, new)
        for ckpt_part, (param_part, shard_id) in self.packed_modules.items():
            if ckpt_part in key:
                return key.replace(ckpt_part, param_part), shard_id
        return key, None


class BatchRunner(Protocol):
    """What a processor may ask of the engine, on rank 0's engine thread."""
    max_batch_tokens: int
    max_batch_seqs: int

    @property
    def embedding_size(self) -> int: ...

    def forward_batch(self, batch: Batch) -> torch.Tensor:
        """Run one packed batch on every rank; float32 [rows, embedding_size], pooled."""

    def embed_by_length(self, lengths: list[int], run_batch: Callable) -> torch.Tensor:
        """Sort inputs of these token lengths, pack them by the budgets and call run_batch(indices, lane)
        per batch; float32 [len(lengths), embedding_size] in input order."""


class Processor(Protocol):
    """A multimodal family's rank-0 input processor."""

    def prepare_items(self, text: TextProcessor, items: list, truncate: bool) -> list:
        """Items -> prepared inputs (token ids, pixels, positions), in any thread; `text` is the calling
        thread's TextProcessor. Raises ValueError naming a bad item."""

    def cost(self, prepared) -> int:
        """Tokens one prepared input takes in a batch."""

    def embed_prepared(self, runner: BatchRunner, prepared: list) -> torch.Tensor:
        """float32 [len(prepared), embedding_size] in order, unnormalized; the engine thread."""


@dataclass(frozen=True)
class ProcessorSetup:
    """What a processor is built from, on rank 0."""
    model_dir: str
    model_name: str
    config: ModelConfig
    text: TextProcessor
    options: EngineConfig


@dataclass(frozen=True)
class ModelSpec:
    """One model family.

    build_config(hf, raw, tp_size, name, model_dir) -> ModelConfig: hf is transformers' config, raw
        config.json's dict (overrides applied to both); raises ConfigError for a tp that does not fit. The
        config's `head` (None for an embedder) and `splade` (a SPLADE model's pooling) say what the model
        serves (ModelConfig.tasks).
    model_class(config): the nn.Module; forward(batch, attention_backend) returns hidden states
        [num_tokens, hidden], or one vector per input when default_pooling is None (the model pools itself).
    flags: the FAMILY_FLAGS it takes; flag_notes: why a flag it does not take does not apply, where
        FAMILY_FLAGS' generic words are not enough.
    prunes_last_layer: forward also takes `rows` (keyword): the final layer then computes its attention
        output projection and MLP only for those rows and returns [len(rows), hidden] (last-layer pruning:
        the engine passes the rows cls or last pooling reads).
    """
    name: str
    architectures: tuple[str, ...]
    build_config: Callable[..., ModelConfig]
    model_class: type
    checkpoint: CheckpointLayout
    default_pooling: str | None
    processor: Callable[[ProcessorSetup], Processor] | None = None
    flags: frozenset[str] = frozenset()
    flag_notes: dict = field(default_factory=dict)
    prunes_last_layer: bool = False
