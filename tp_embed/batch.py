"""The ragged batch: every sequence packed end to end, no padding."""

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # int32 [num_tokens]
    positions: torch.Tensor  # int32 [num_tokens], or [3, num_tokens] for M-RoPE (Qwen2-VL)
    cu_seqlens: torch.Tensor  # int32 [num_seqs + 1]
    max_seqlen: int
    # images, when present; the layout of pixel_values is the model's (CLIP: one row per image,
    # Qwen2-VL: one row per patch), image_grid_thw int32 [num_images, 3] gives each image's patch grid
    pixel_values: torch.Tensor | None = None  # float [rows, row_len]
    image_grid_thw: torch.Tensor | None = None
    # cross-encoders' segments: int32 [num_tokens], 0 for the query's tokens and 1 for the document's;
    # None means every token is segment 0
    token_type_ids: torch.Tensor | None = None
    # what rank 0 returns (tp_embed/token_heads.py): 0 the pooled rows; else a token head's row for every token,
    # and then no rank prunes the last layer
    output: int = 0

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else self.image_grid_thw.shape[0]

    @staticmethod
    def from_token_ids(sequences: list[list[int]], device: torch.device | str = "cpu",
                       pixel_values: torch.Tensor | None = None,
                       image_grid_thw: torch.Tensor | None = None,
                       type_starts: list[int] | None = None, output: int = 0) -> "Batch":
        """Pack token-id lists end to end; positions restart at 0 in each sequence. A batch may hold
        images and no sequences (an image-only request to CLIP). `type_starts[i]` is the position where
        sequence i's second segment begins (its length when it has one segment)."""
        lens = [len(s) for s in sequences]
        if (not sequences and pixel_values is None) or (lens and min(lens) == 0):
            raise ValueError("a batch needs at least one sequence or image, and no empty sequence")
        flat = [t for s in sequences for t in s]
        input_ids = torch.tensor(flat, dtype=torch.int32)
        cu_seqlens = torch.zeros(len(lens) + 1, dtype=torch.int32)
        if lens:
            cu_seqlens[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        positions = (torch.arange(len(flat), dtype=torch.int32)
                     - torch.repeat_interleave(cu_seqlens[:-1], torch.tensor(lens, dtype=torch.long)))
        token_types = None
        if type_starts is not None:
            starts = torch.repeat_interleave(torch.tensor(type_starts, dtype=torch.int32),
                                             torch.tensor(lens, dtype=torch.long))
            token_types = (positions >= starts).to(torch.int32)
        batch = Batch(input_ids, positions, cu_seqlens, max(lens, default=0), pixel_values,
                      None if image_grid_thw is None else image_grid_thw.to(torch.int32), token_types, output)
        return batch.to(device)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(self.input_ids.to(device), self.positions.to(device), self.cu_seqlens.to(device),
                     self.max_seqlen, move(self.pixel_values), move(self.image_grid_thw),
                     move(self.token_type_ids), self.output)
