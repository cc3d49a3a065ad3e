"""CLIP (`CLIPModel`, e.g. openai/clip-vit-large-patch14-336): a causal text transformer and a ViT, each
ending in its own pooling and a linear projection into one shared space, sharded like the other models.

Both towers use pre-LN blocks with quick_gelu(x) = x * sigmoid(1.702 x):

    x = x + out_proj(attn(layer_norm1(x)))
    x = x + fc2(quick_gelu(fc1(layer_norm2(x))))

    text:   h = token_embedding[ids] + position_embedding[positions] -> blocks (causal) -> final_layer_norm
            -> h at the EOS token -> text_projection
    vision: an S x S image is cut into (S/P)^2 patches of C*P*P values; h = [class_embedding; W p_j]
            + position_embedding -> pre_layrnorm -> blocks (bidirectional) -> post_layernorm(h_cls)
            -> visual_projection

The model pools itself: `forward` returns [num_seqs + num_images, projection_dim], the packed
sequences' text vectors first, then one image vector per row of `batch.pixel_values`.
`ClipProcessor` (rank 0) turns items into such batches.
"""

import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from tp_embed.batch import Batch
from tp_embed.config import ConfigError, ModelConfig, divide, divisors, pad_vocab, tp_error
from tp_embed.layers.attention import Attention, plan_attention
from tp_embed.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from tp_embed.layers.norm import LayerNorm
from tp_embed.layers.replicated import ReplicatedEmbedding, ReplicatedLinear, replicated_parameter
from tp_embed.models.spec import BatchRunner, CheckpointLayout, ModelSpec, ProcessorSetup
from tp_embed.packing import pack
from tp_embed.text import InputTooLongError

# transformers keeps the pooling of checkpoints whose text config says eos_token_id == 2 (the original
# OpenAI ones, from before huggingface/transformers#24773): the EOS is the largest id in their vocabulary.
LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class ClipTowerConfig:
    """One tower's shape and the heads each tensor-parallel rank holds."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_local_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    hidden_act: str

    @staticmethod
    def from_hf(hf_tower, tp_size: int) -> "ClipTowerConfig":
        return ClipTowerConfig(
            hidden_size=hf_tower.hidden_size, num_layers=hf_tower.num_hidden_layers,
            num_heads=hf_tower.num_attention_heads,
            num_local_heads=divide(hf_tower.num_attention_heads, tp_size),
            head_dim=divide(hf_tower.hidden_size, hf_tower.num_attention_heads),
            intermediate_size=hf_tower.intermediate_size, norm_eps=hf_tower.layer_norm_eps,
            hidden_act=hf_tower.hidden_act)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_heads, bias=True)
        self.out_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, attn: Attention) -> torch.Tensor:
        cfg = self.cfg
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).view(num_tokens, 3 * cfg.num_local_heads, cfg.head_dim).chunk(3, dim=1)
        o = attn.run(q, k, v)  # [num_tokens, local_heads, head_dim]
        return self.out_proj(o.reshape(num_tokens, cfg.num_local_heads * cfg.head_dim))


class ClipMLP(nn.Module):
    """fc2(act(fc1(x))): fc1 split by output columns, fc2 by input rows, one all-reduce."""

    def __init__(self, cfg: ClipTowerConfig):
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.act = ACT2FN[cfg.hidden_act]  # quick_gelu for the OpenAI checkpoints
        self.fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: ClipTowerConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor, attn: Attention) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attn)
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, attn: Attention) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, attn)
        return x


def eos_token_indices(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      eos_token_id: int) -> torch.Tensor:
    """Index in the packed batch of the token each sequence is pooled at, as transformers'
    CLIPTextTransformer picks it: the first `eos_token_id` of the sequence (its first token when there
    is none), or, for the legacy eos_token_id == 2, the first occurrence of the sequence's largest id."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(lens.numel(), device=input_ids.device), lens)
    pos_idx = torch.arange(input_ids.numel(), device=input_ids.device) - cu[:-1][seq_idx]
    ids = input_ids.long()
    # padding never wins the argmax: -1 is below every id, False below every True
    key = ids if eos_token_id == LEGACY_EOS_TOKEN_ID else (ids == eos_token_id).long()
    padded = torch.full((lens.numel(), max_seqlen), -1, dtype=torch.long, device=ids.device)
    padded[seq_idx, pos_idx] = key  # [num_seqs, max_seqlen]
    return cu[:-1] + padded.argmax(dim=1)  # argmax returns the first of equal maxima


class ClipTextEmbeddings(nn.Module):
    def __init__(self, hf_text, vocab_size_padded: int):
        super().__init__()
        self.token_embedding = VocabParallelEmbedding(vocab_size_padded, hf_text.hidden_size)
        self.position_embedding = ReplicatedEmbedding(hf_text.max_position_embeddings, hf_text.hidden_size)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.token_embedding(batch.input_ids) + self.position_embedding(batch.positions)


class ClipTextTransformer(nn.Module):
    def __init__(self, hf_text, tp_size: int, vocab_size_padded: int):
        super().__init__()
        self.cfg = ClipTowerConfig.from_hf(hf_text, tp_size)
        self.eos_token_id = hf_text.eos_token_id
        self.embeddings = ClipTextEmbeddings(hf_text, vocab_size_padded)
        self.encoder = ClipEncoder(self.cfg)
        self.final_layer_norm = LayerNorm(self.cfg.hidden_size, self.cfg.norm_eps)

    def forward(self, batch: Batch, attention_backend: str) -> torch.Tensor:
        """Packed token ids -> the EOS token's final hidden state per sequence, [num_seqs, hidden]."""
        cfg = self.cfg
        x = self.embeddings(batch)  # [num_tokens, hidden]
        attn = plan_attention(batch.cu_seqlens, batch.max_seqlen, cfg.num_local_heads, cfg.num_local_heads,
                              cfg.head_dim, True, x.dtype, attention_backend)
        x = self.encoder(x, attn)
        eos = eos_token_indices(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, self.eos_token_id)
        # layer norm is per token: normalizing only the pooled ones gives the same vectors
        return self.final_layer_norm(x[eos])


class ClipPatchEmbedding(nn.Module):
    """The stride-P, kernel-P convolution of the checkpoint as the matmul it is: each patch's C*P*P values
    times the weight [hidden, C, P, P] flattened to [hidden, C*P*P]."""

    def __init__(self, hidden_size: int, num_channels: int, patch_size: int):
        super().__init__()
        self.weight = replicated_parameter(hidden_size, num_channels, patch_size, patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return patches @ self.weight.flatten(1).t()


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, hf_vision):
        super().__init__()
        self.num_channels, self.image_size, self.patch_size = (hf_vision.num_channels, hf_vision.image_size,
                                                               hf_vision.patch_size)
        self.grid = divide(self.image_size, self.patch_size)
        self.class_embedding = replicated_parameter(hf_vision.hidden_size)
        self.patch_embedding = ClipPatchEmbedding(hf_vision.hidden_size, self.num_channels, self.patch_size)
        self.position_embedding = ReplicatedEmbedding(self.grid ** 2 + 1, hf_vision.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_images, C*S*S] (each row a flattened [C, S, S] image) ->
        [num_images * (1 + (S/P)^2), hidden]: per image its class token, then its patches row by row."""
        n, c, g, p = pixel_values.shape[0], self.num_channels, self.grid, self.patch_size
        x = pixel_values.to(self.class_embedding.dtype).view(n, c, g, p, g, p)
        patches = x.permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)  # [images, patches, C*P*P]
        cls = self.class_embedding.expand(n, 1, -1)
        x = torch.cat([cls, self.patch_embedding(patches)], dim=1) + self.position_embedding.weight
        return x.reshape(n * (g * g + 1), -1)


class ClipVisionTransformer(nn.Module):
    def __init__(self, hf_vision, tp_size: int):
        super().__init__()
        self.cfg = ClipTowerConfig.from_hf(hf_vision, tp_size)
        self.embeddings = ClipVisionEmbeddings(hf_vision)
        self.pre_layrnorm = LayerNorm(self.cfg.hidden_size, self.cfg.norm_eps)  # sic: the checkpoint's name
        self.encoder = ClipEncoder(self.cfg)
        self.post_layernorm = LayerNorm(self.cfg.hidden_size, self.cfg.norm_eps)

    def forward(self, pixel_values: torch.Tensor, attention_backend: str) -> torch.Tensor:
        """[num_images, C*S*S] -> the class token's final hidden state per image, [num_images, hidden]."""
        cfg = self.cfg
        num_images, seq_len = pixel_values.shape[0], self.embeddings.grid ** 2 + 1
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # [num_images * seq_len, hidden]
        # every image is one sequence of the same length
        cu_seqlens = torch.arange(num_images + 1, dtype=torch.int32, device=x.device) * seq_len
        attn = plan_attention(cu_seqlens, seq_len, cfg.num_local_heads, cfg.num_local_heads, cfg.head_dim,
                              False, x.dtype, attention_backend)
        x = self.encoder(x, attn)
        return self.post_layernorm(x[cu_seqlens[:-1].long()])


class ClipModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hf = cfg.hf_config
        self.text_model = ClipTextTransformer(hf.text_config, cfg.tp_size, cfg.vocab_size_padded)
        self.vision_model = ClipVisionTransformer(hf.vision_config, cfg.tp_size)
        self.text_projection = ReplicatedLinear(hf.text_config.hidden_size, hf.projection_dim)
        self.visual_projection = ReplicatedLinear(hf.vision_config.hidden_size, hf.projection_dim)

    def forward(self, batch: Batch, attention_backend: str = "auto") -> torch.Tensor:
        """[num_seqs + num_images, projection_dim], unnormalized: text vectors, then image vectors."""
        out = []
        if batch.num_seqs:
            out.append(self.text_projection(self.text_model(batch, attention_backend)))
        if batch.pixel_values is not None and batch.pixel_values.shape[0]:
            out.append(self.visual_projection(self.vision_model(batch.pixel_values, attention_backend)))
        return torch.cat(out)


class ClipProcessor:
    """Rank 0: CLIP items -> packed batches -> one vector per item.

    Texts go through the engine's TextProcessor (the model's tokenizer, its 77-token limit and the
    truncation rules). Images are preprocessed as the checkpoint's preprocessor_config.json says (resize
    the shortest side, bicubic; center crop; rescale; normalize by mean and std) by transformers'
    CLIPImageProcessorPil, the PIL backend: the numbers of the original CLIP preprocessing, and no
    torchvision needed. Each image is one row [C*S*S] of `pixel_values` and costs 1 + (S/P)^2 tokens of
    the batch's token budget.
    """

    max_batch_images = 32  # bounds the pixel tensor a batch broadcasts (CLIP-L/336: 1.35 MB per image)

    def __init__(self, model_dir: str, config: ModelConfig):
        from transformers import CLIPImageProcessorPil

        if not os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
            raise ConfigError(f"{model_dir} has no preprocessor_config.json: CLIP needs it to preprocess images")
        self.image_processor = CLIPImageProcessorPil.from_pretrained(model_dir)
        vision = config.hf_config.vision_config
        self.image_size, self.grid = vision.image_size, divide(vision.image_size, vision.patch_size)
        crop = self.image_processor.crop_size
        if not self.image_processor.do_center_crop or (crop.height, crop.width) != (self.image_size,) * 2:
            raise ConfigError(f"{model_dir}/preprocessor_config.json must center-crop to {self.image_size}x"
                              f"{self.image_size}, the vision tower's image_size")
        self.tokens_per_image = self.grid ** 2 + 1

    def pixel_rows(self, images: list) -> torch.Tensor:
        """PIL images -> float32 [num_images, 3 * S * S], each row a preprocessed [3, S, S] image."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.float().reshape(len(images), -1)

    def prepare_items(self, text, items: list, truncate: bool) -> list["ClipInput"]:
        """Items -> one ClipInput each: a text's token ids (through `text`, a TextProcessor: the server's
        tokenizer threads pass their own) or an image's preprocessed pixels. Runs off the engine thread.
        Raises ValueError naming the item (both text and image, an instruction), InputTooLongError."""
        for i, item in enumerate(items):
            if item.text is not None and item.image is not None:
                raise ValueError(f"input {i} has both text and an image: CLIP embeds text and images separately, "
                                 f"one vector each; send them as two inputs, or serve a model that embeds them "
                                 f"together (such as GME)")
            if item.instruction is not None:
                raise ValueError(f"input {i} has an instruction, which CLIP does not take; write any prompt "
                                 f"(e.g. 'a photo of ') into the text itself")
        text_items = [i for i, item in enumerate(items) if item.text is not None]
        image_items = [i for i, item in enumerate(items) if item.image is not None]
        try:
            sequences = text.encode([items[i].text for i in text_items], truncate) if text_items else []
        except InputTooLongError as e:
            raise InputTooLongError(text_items[e.index], e.num_tokens, e.limit) from None
        prepared = [None] * len(items)
        for i, ids in zip(text_items, sequences):
            prepared[i] = ClipInput(input_ids=ids)
        if image_items:
            for i, row in zip(image_items, self.pixel_rows([items[i].image for i in image_items])):
                prepared[i] = ClipInput(pixels=row)
        return prepared

    def cost(self, p: "ClipInput") -> int:
        """Tokens an input takes in a batch: its text's, or the vision tower's 1 + (S/P)^2."""
        return len(p.input_ids) if p.input_ids is not None else self.tokens_per_image

    def embed_prepared(self, runner: BatchRunner, prepared: list["ClipInput"]) -> torch.Tensor:
        """float32 [len(prepared), projection_dim] in order: a text's text vector, an image's image vector
        (unnormalized: the caller normalizes). Texts sorted by length (similar lengths share a batch),
        then images, packed by the runner's budgets and max_batch_images."""
        text_items = [i for i, p in enumerate(prepared) if p.input_ids is not None]
        image_items = [i for i, p in enumerate(prepared) if p.input_ids is None]
        order = sorted(text_items, key=lambda i: len(prepared[i].input_ids)) + image_items
        out = torch.empty(len(prepared), runner.embedding_size, dtype=torch.float32)
        for group in pack([self.cost(prepared[i]) for i in order], runner.max_batch_tokens, runner.max_batch_seqs,
                          [prepared[i].input_ids is None for i in order], self.max_batch_images):
            group = [order[j] for j in group]
            texts = [i for i in group if prepared[i].input_ids is not None]
            images = [i for i in group if prepared[i].input_ids is None]
            pixels = grid = None
            if images:
                pixels = stack_rows([prepared[i].pixels for i in images])
                grid = torch.tensor([[1, self.grid, self.grid]] * len(images), dtype=torch.int32)
            batch = Batch.from_token_ids([prepared[i].input_ids for i in texts], pixel_values=pixels,
                                         image_grid_thw=grid)
            out[texts + images] = runner.forward_batch(batch)  # the model returns texts first, then images
        return out


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """[D] rows -> [len(rows), D]: a view where they are consecutive rows of one contiguous tensor (the
    images of one request, as pixel_rows made them), else a copy."""
    first, width = rows[0], rows[0].numel()
    storage = first.untyped_storage().data_ptr()
    if first.is_contiguous() and all(r.is_contiguous() and r.untyped_storage().data_ptr() == storage
                                     and r.storage_offset() == first.storage_offset() + k * width
                                     for k, r in enumerate(rows)):
        return first.as_strided((len(rows), width), (width, 1))
    return torch.stack(rows)


@dataclass
class ClipInput:
    """One prepared CLIP item: a text's token ids, or an image's preprocessed pixels."""
    input_ids: list[int] | None = None
    pixels: torch.Tensor | None = None  # float32 [3 * S * S]


def build_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    """CLIPModel: tp must divide both towers' heads. The shape fields describe the text tower (what
    tokenization and packing read: vocabulary, 77 positions); embedding_size is projection_dim, the size of
    every output vector. The model reads each tower's shape from hf.text_config / hf.vision_config."""
    text, vision = hf.text_config, hf.vision_config
    text_heads, vision_heads = text.num_attention_heads, vision.num_attention_heads
    if tp_size < 1 or text_heads % tp_size or vision_heads % tp_size:
        raise tp_error(tp_size, f"does not divide the attention heads of {name} (text tower {text_heads}, "
                                f"vision tower {vision_heads})", divisors(math.gcd(text_heads, vision_heads)))
    return ModelConfig(
        hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=text_heads,
        num_kv_heads=text_heads, head_dim=text.hidden_size // text_heads, intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size, norm_eps=text.layer_norm_eps, max_position_embeddings=text.max_position_embeddings,
        causal=True, hidden_act=text.hidden_act, gated_mlp=False, tp_size=tp_size,
        num_local_heads=text_heads // tp_size, num_local_kv_heads=text_heads // tp_size,
        vocab_size_padded=pad_vocab(text.vocab_size, tp_size), embedding_size=hf.projection_dim, hf_config=hf,
        qkv_bias=True)


def build_processor(setup: ProcessorSetup) -> ClipProcessor:
    return ClipProcessor(setup.model_dir, setup.config)


SPEC = ModelSpec(
    name="CLIP",
    architectures=("CLIPModel",),
    build_config=build_config,
    model_class=ClipModel,
    checkpoint=CheckpointLayout(
        ignored_prefixes=("logit_scale",),  # the contrastive temperature: not part of either embedding
        packed_modules={
            "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
            "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
            "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
        }),
    default_pooling=None,  # each tower pools itself before its projection
    processor=build_processor,
    flag_notes={"pooling": "CLIP's towers pool themselves (the text tower at its end-of-text token, the vision "
                           "tower at its class token) before their projections; leave --pooling out"},
)
