"""Model families: architecture name -> implementation."""

from tp_embed.config import ModelConfig


def build_model(config: ModelConfig, dtype, device):
    from tp_embed.models.bert import BertModel
    from tp_embed.models.clip import ClipModel
    from tp_embed.models.decoder import DecoderModel
    from tp_embed.models.qwen2_vl import Qwen2VLModel

    cls = {"decoder": DecoderModel, "encoder": BertModel, "qwen2_vl": Qwen2VLModel,
           "clip": ClipModel}[config.family]
    with torch_default(dtype, device):
        model = cls(config)
    return model.eval()


def build_processor(engine):
    """Rank 0's multimodal input processor for the model family, or None for text-only families.
    A processor has `prepare_items(text, items, truncate) -> prepared inputs` (any thread),
    `cost(prepared input) -> tokens` and `embed_prepared(engine, prepared) -> float32 [len(prepared), dim]`
    (the engine thread)."""
    if engine.config.family == "qwen2_vl":
        from tp_embed.models.qwen2_vl import GmeProcessor
        return GmeProcessor(engine)
    if engine.config.family == "clip":
        from tp_embed.models.clip import ClipProcessor
        return ClipProcessor(engine.model_dir, engine.config)
    return None


class torch_default:
    """Build parameters directly at their shard shape, dtype and device (no float32 CPU detour)."""

    def __init__(self, dtype, device):
        import torch
        self.torch, self.dtype, self.device = torch, dtype, device

    def __enter__(self):
        self.old_dtype = self.torch.get_default_dtype()
        self.torch.set_default_dtype(self.dtype)
        self.device_ctx = self.torch.device(self.device)
        self.device_ctx.__enter__()

    def __exit__(self, *exc):
        self.device_ctx.__exit__(*exc)
        self.torch.set_default_dtype(self.old_dtype)
