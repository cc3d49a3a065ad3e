"""Qwen2-VL (`Qwen2VLForConditionalGeneration`) for GME embeddings.

    image -> smart resize to multiples of 28 -> patch rows [num_patches, 3*2*14*14] in merge-window order
          -> PatchEmbed -> VisionBlock x depth (full attention within each image, 2-D rotary)
          -> PatchMerger (each 2x2 window -> one token) -> [num_patches/4, hidden]
          -> scattered over the <|image_pad|> tokens -> the Qwen2 decoder with M-RoPE -> last token

The text side is `DecoderModel` as it is; this file adds the vision tower and, on rank 0, `GmeProcessor`,
which renders GME's chat template, preprocesses images as Qwen2-VL's image processor does and lays out
the [3, num_tokens] M-RoPE positions. Sharding: each vision block splits like a decoder layer (qkv and fc1
by column, proj and fc2 by row, one all-reduce each), the merger's first linear by column and its second
by row; the patch embedding and the norms are replicated.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2VLImageProcessorPil  # numpy/PIL: needs no torchvision

from tp_embed.batch import Batch
from tp_embed.config import ConfigError, ModelConfig, tp_error
from tp_embed.layers.attention import Attention, plan_attention
from tp_embed.layers.linear import ColumnParallelLinear, RowParallelLinear, StackedColumnParallelLinear
from tp_embed.layers.norm import LayerNorm
from tp_embed.layers.rotary import apply_rotary
from tp_embed.layers.weights import replicated_weight_loader
from tp_embed.models import decoder
from tp_embed.models.decoder import DecoderModel
from tp_embed.models.spec import BatchRunner, CheckpointLayout, ModelSpec, ProcessorSetup

GME_TEMPLATE = "gme-qwen2-vl"
DEFAULT_INSTRUCTION = "You are a helpful assistant."
IMAGE_PAD = "<|image_pad|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's shape (config.json's vision_config) and this rank's share of its heads."""
    depth: int
    embed_dim: int
    num_heads: int
    num_local_heads: int
    head_dim: int
    mlp_hidden: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    out_hidden: int  # the decoder's hidden size, which the merger projects to
    rope_theta: float

    @staticmethod
    def from_hf(vc, tp: int) -> "VisionConfig":
        if vc.hidden_act != "quick_gelu":
            raise ConfigError(f"Qwen2-VL vision MLP supports hidden_act 'quick_gelu', not {vc.hidden_act!r}")
        rope = getattr(vc, "rope_parameters", None) or {}
        return VisionConfig(
            depth=vc.depth, embed_dim=vc.embed_dim, num_heads=vc.num_heads, num_local_heads=vc.num_heads // tp,
            head_dim=vc.embed_dim // vc.num_heads, mlp_hidden=int(vc.embed_dim * vc.mlp_ratio),
            in_channels=vc.in_channels, patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
            merge_size=vc.spatial_merge_size, out_hidden=vc.hidden_size, rope_theta=rope.get("rope_theta", 10000.0))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch) sees each patch row exactly once, so it
    is a matmul: y = x W^T with W the conv weight flattened to [embed_dim, C*T*P*P] (the processor
    flattens each patch in the same (C, T, P, P) order). Kept as a Conv3d for the checkpoint's name and
    shape; replicated."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        kernel = (vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        self.proj = nn.Conv3d(vc.in_channels, vc.embed_dim, kernel, stride=kernel, bias=False)
        self.proj.weight.requires_grad_(False)
        self.proj.weight.weight_loader = replicated_weight_loader

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.linear(pixel_values, self.proj.weight.flatten(1))  # [num_patches, embed_dim]


class VisionAttention(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.vc = vc
        self.qkv = StackedColumnParallelLinear(vc.embed_dim, vc.embed_dim, 3, bias=True)  # q, k, v
        self.proj = RowParallelLinear(vc.embed_dim, vc.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention) -> torch.Tensor:
        n = x.shape[0]
        # [num_patches, local_heads, head_dim] each
        q, k, v = self.qkv(x).view(n, 3, self.vc.num_local_heads, self.vc.head_dim).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(attn.run(q, k, v).reshape(n, -1))


class VisionMLP(nn.Module):
    """fc2(quick_gelu(fc1(x))), quick_gelu(x) = x * sigmoid(1.702 x); fc1 by column, fc2 by row."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.fc1 = ColumnParallelLinear(vc.embed_dim, vc.mlp_hidden, bias=True)
        self.fc2 = RowParallelLinear(vc.mlp_hidden, vc.embed_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class VisionBlock(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(vc.embed_dim, 1e-6)
        self.norm2 = LayerNorm(vc.embed_dim, 1e-6)
        self.attn = VisionAttention(vc)
        self.mlp = VisionMLP(vc)

    def forward(self, x, cos, sin, attn):
        x = x + self.attn(self.norm1(x), cos, sin, attn)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each merge window of m x m neighbouring patches (consecutive rows, thanks to the merge-window
    order) becomes one token: y = W_2 gelu(W_1 [ln(x_1); ...; ln(x_m*m)] + b_1) + b_2. W_1 is split by
    column, W_2 by row."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.window = vc.embed_dim * vc.merge_size ** 2
        self.ln_q = LayerNorm(vc.embed_dim, 1e-6)
        self.mlp = nn.Sequential(ColumnParallelLinear(self.window, self.window, bias=True), nn.GELU(),
                                 RowParallelLinear(self.window, vc.out_hidden, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.window))  # [num_patches / m^2, out_hidden]


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.vc = vc
        self.patch_embed = PatchEmbed(vc)
        self.blocks = nn.ModuleList(VisionBlock(vc) for _ in range(vc.depth))
        self.merger = PatchMerger(vc)
        # head_dim/4 frequencies: half of each head turns with the patch's row, half with its column
        dim = vc.head_dim // 2
        inv_freq = 1.0 / (vc.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, grid_thw: list[list[int]], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_patches, head_dim/2]: patch (r, c) of its image turns by the angles
        [r f; c f]. Patches come in merge-window order: image, frame, window row, window column, then
        the m x m patches inside the window."""
        m = self.vc.merge_size
        rows, cols = [], []
        for t, h, w in grid_thw:
            shape = (h // m, m, w // m, m)  # indexed [window row, row in window, window col, col in window]
            r = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(shape)
            c = torch.arange(w, device=device).view(1, 1, w // m, m).expand(shape)
            rows.append(r.permute(0, 2, 1, 3).flatten().repeat(t))
            cols.append(c.permute(0, 2, 1, 3).flatten().repeat(t))
        inv_freq = self.inv_freq.to(device)
        angles = torch.cat([torch.cat(rows)[:, None] * inv_freq, torch.cat(cols)[:, None] * inv_freq], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                attention_backend: str = "auto") -> torch.Tensor:
        """pixel_values [num_patches, C*T*P*P], image_grid_thw [num_images, 3] (in patches) ->
        merged image tokens [num_patches / m^2, out_hidden], images in order."""
        x = self.patch_embed(pixel_values)  # [num_patches, embed_dim]
        grid = image_grid_thw.tolist()
        cos, sin = self.rotary(grid, x.device, x.dtype)
        # full attention inside each frame of each image, never across images
        seqlens = [h * w for t, h, w in grid for _ in range(t)]
        cu_seqlens = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
        attn = plan_attention(cu_seqlens, max(seqlens), self.vc.num_local_heads, self.vc.num_local_heads,
                              self.vc.head_dim, False, x.dtype, attention_backend)
        for block in self.blocks:
            x = block(x, cos, sin, attn)
        return self.merger(x)


class Qwen2VLModel(DecoderModel):
    """Qwen2-VL: the Qwen2 decoder (DecoderModel as is, M-RoPE from the config's mrope_section) and
    `visual`, the vision tower, whose tokens replace the image-pad token embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.visual = Qwen2VisionTransformer(VisionConfig.from_hf(cfg.hf_config.vision_config, cfg.tp_size))
        self.image_token_id = cfg.hf_config.image_token_id

    def forward(self, batch: Batch, attention_backend: str = "auto") -> torch.Tensor:
        """Last hidden states [num_tokens, hidden]; batch.positions [3, num_tokens] when it holds images."""
        x = self.embed_tokens(batch.input_ids)  # [num_tokens, hidden]
        if batch.num_images:
            image_embeds = self.visual(batch.pixel_values.to(x.dtype), batch.image_grid_thw, attention_backend)
            x[batch.input_ids == self.image_token_id] = image_embeds
        return super().forward(batch, attention_backend, inputs_embeds=x)


@dataclass
class PreparedItem:
    input_ids: list[int]  # image pads expanded
    positions: torch.Tensor  # int32 [3, len(input_ids)]
    pixel_values: torch.Tensor | None = None  # float32 [num_patches, C*T*P*P]
    grid_thw: tuple[int, int, int] | None = None  # in patches


def render(item, chat_template: str | None) -> str:
    """The prompt of one item, with one <|image_pad|> per image (expanded after tokenization).

    With GME's template: <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{X}<|im_end|>\\n
    <|im_start|>assistant\\n<|endoftext|>, X the text, the image placeholder, or the placeholder directly
    followed by the text. Without a template, X alone.
    """
    x = (IMAGE_PLACEHOLDER if item.image is not None else "") + (item.text or "")
    if chat_template is None:
        if item.instruction is not None:
            raise ValueError(f"an instruction needs the chat template: start the server with "
                             f"--chat-template {GME_TEMPLATE}")
        return x
    instruction = DEFAULT_INSTRUCTION if item.instruction is None else item.instruction
    return (f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{x}<|im_end|>\n"
            f"<|im_start|>assistant\n<|endoftext|>")


def mrope_positions(num_tokens: int, image_start: int | None = None,
                    image_grid: tuple[int, int, int] | None = None) -> torch.Tensor:
    """int32 [3, num_tokens] (temporal, row, column) positions of one sequence with at most one image.

    Text tokens count up on all three axes. The image's tokens, starting at index s with a merged grid
    (t, rows, cols), sit at (s + frame, s + row, s + col); the text after it resumes at s + max(rows,
    cols), as transformers' get_rope_index does (images have t = 1).
    """
    positions = torch.arange(num_tokens, dtype=torch.int32).expand(3, -1).clone()
    if image_start is not None:
        t, h, w = image_grid
        s, n = image_start, t * h * w
        grid = torch.meshgrid(*(torch.arange(k, dtype=torch.int32) for k in (t, h, w)), indexing="ij")
        positions[:, s:s + n] = torch.stack(grid).reshape(3, n) + s
        positions[:, s + n:] = torch.arange(num_tokens - s - n, dtype=torch.int32) + s + max(h, w)
    return positions


class GmeProcessor:
    """Rank 0: Items -> rendered prompts, token ids, image patches and M-RoPE positions -> packed Batches
    -> one last-token vector per item (normalization is the caller's, as for text)."""

    def __init__(self, setup: ProcessorSetup):
        options = setup.options
        if options.chat_template not in (None, GME_TEMPLATE):
            raise ConfigError(f"--chat-template {options.chat_template!r} is not a Qwen2-VL template; "
                              f"use {GME_TEMPLATE} (GME) or leave it out")
        self.chat_template = options.chat_template
        self.tokenizer = setup.text.tokenizer
        hf = setup.config.hf_config
        self.image_token_id = hf.image_token_id
        pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if pad_id != self.image_token_id:
            raise ConfigError(f"{setup.model_name}: the tokenizer's {IMAGE_PAD} is id {pad_id}, but config.json "
                              f"says image_token_id={self.image_token_id}")
        vc = hf.vision_config
        self.merge_size = vc.spatial_merge_size
        # smart resize to multiples of patch*merge (28) within [min, max] pixels, bicubic, rescale,
        # CLIP mean/std, patch rows in merge-window order
        self.image_processor = Qwen2VLImageProcessorPil(
            min_pixels=options.min_pixels, max_pixels=options.max_pixels, patch_size=vc.patch_size,
            temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size)

    def prepare(self, item, tokenizer=None) -> PreparedItem:
        """One item's ids, positions and patches; `tokenizer` (default the engine's) is the calling
        thread's own where several threads prepare at once (fast tokenizers are not thread-safe)."""
        # the template carries its own <|endoftext|>: the tokenizer must add nothing; the lengths are checked
        # later (with the image's tokens), so transformers' over-length warning would only mislead
        ids = (tokenizer or self.tokenizer)(render(item, self.chat_template), add_special_tokens=False,
                                            verbose=False)["input_ids"]
        if ids.count(self.image_token_id) != (item.image is not None):
            raise ValueError(f"the text or instruction contains the image placeholder {IMAGE_PAD}")
        if item.image is None:
            return PreparedItem(ids, mrope_positions(len(ids)))
        out = self.image_processor(images=[item.image.convert("RGB")], return_tensors="np")
        t, h, w = (int(k) for k in out["image_grid_thw"][0])
        m = self.merge_size
        start = ids.index(self.image_token_id)
        ids = ids[:start] + [self.image_token_id] * (t * h * w // m ** 2) + ids[start + 1:]
        return PreparedItem(ids, mrope_positions(len(ids), start, (t, h // m, w // m)),
                            torch.from_numpy(out["pixel_values"]).float(), (t, h, w))

    @staticmethod
    def make_batch(prepared: list[PreparedItem]) -> Batch:
        """Sequences packed end to end; images in the order of their pads in input_ids."""
        images = [p for p in prepared if p.pixel_values is not None]
        batch = Batch.from_token_ids(
            [p.input_ids for p in prepared],
            pixel_values=torch.cat([p.pixel_values for p in images]) if images else None,
            image_grid_thw=torch.tensor([p.grid_thw for p in images], dtype=torch.int32) if images else None)
        batch.positions = torch.cat([p.positions for p in prepared], dim=1)  # [3, num_tokens]
        return batch

    def prepare_items(self, text, items: list, truncate: bool | None = None) -> list[PreparedItem]:
        """Items -> PreparedItems, off the engine thread (`text`: the calling thread's TextProcessor).
        Raises ValueError naming the item for a bad image or text, InputTooLongError for a long one: a
        rendered item is never truncated (`truncate` is accepted for the common signature), since cutting
        it would drop the template's closing tokens that the last-token pooling reads."""
        prepared = []
        for i, item in enumerate(items):
            try:
                prepared.append(self.prepare(item, text.tokenizer))
            except ValueError as e:  # the image processor's, e.g. an aspect ratio over 200
                raise ValueError(f"item {i}: {e}") from e
        text.check_lengths([p.input_ids for p in prepared])
        return prepared

    @staticmethod
    def cost(p: PreparedItem) -> int:
        return len(p.input_ids)

    def embed_prepared(self, runner: BatchRunner, prepared: list[PreparedItem]) -> torch.Tensor:
        """float32 [len(prepared), hidden], pooled as the engine pools (last token), not normalized."""
        return runner.embed_by_length(list(map(self.cost, prepared)),
                                      lambda idx, _: runner.forward_batch(self.make_batch([prepared[i] for i in idx])))


def build_config(hf, raw: dict, tp_size: int, name: str, model_dir: str = "") -> ModelConfig:
    """The Qwen2 decoder's config (transformers keeps it in text_config, and moves a flat, pre-v5
    config.json's keys there too); tp must also divide the vision tower's heads."""
    config = decoder.build_config(hf.get_text_config(), raw, tp_size, name, hf_config=hf)
    vision_heads = hf.vision_config.num_heads
    if vision_heads % tp_size:
        valid = [d for d in decoder.kv_head_tp_values(config.num_heads, config.num_kv_heads) if vision_heads % d == 0]
        raise tp_error(tp_size, f"does not divide the vision tower's num_heads={vision_heads} of {name}", valid)
    return config


SPEC = ModelSpec(
    name="Qwen2-VL (GME)",
    architectures=("Qwen2VLForConditionalGeneration",),
    build_config=build_config,
    model_class=Qwen2VLModel,
    # older checkpoints: visual.* and model.*; transformers 5 module paths: model.visual.* and
    # model.language_model.*. Either way the decoder's weights land on DecoderModel's names.
    checkpoint=CheckpointLayout(strip_prefixes=("model.language_model.", "model."), ignored_prefixes=("lm_head.",),
                                packed_modules=decoder.PACKED_MODULES),
    default_pooling="last",
    processor=GmeProcessor,
    flags=frozenset({"pooling", "chat_template"}),
)
