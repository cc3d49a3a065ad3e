"""The ragged batch: every sequence packed end to end, no padding."""

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # int32 [num_tokens]
    positions: torch.Tensor  # int32 [num_tokens] (per-sequence positions, starting at 0)
    cu_seqlens: torch.Tensor  # int32 [num_seqs + 1]
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @staticmethod
    def from_token_ids(sequences: list[list[int]], device: torch.device | str = "cpu") -> "Batch":
        lens = [len(s) for s in sequences]
        if not sequences or min(lens) == 0:
            raise ValueError("a batch needs at least one sequence and no empty sequence")
        flat = [t for s in sequences for t in s]
        input_ids = torch.tensor(flat, dtype=torch.int32)
        cu_seqlens = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        positions = torch.arange(len(flat), dtype=torch.int32) - torch.repeat_interleave(cu_seqlens[:-1], torch.tensor(lens))
        return Batch(input_ids, positions, cu_seqlens, max(lens)).to(device)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.positions.to(device), self.cu_seqlens.to(device),
                     self.max_seqlen)
