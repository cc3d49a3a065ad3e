"""What rank 0 sends the workers: a fixed-size int64 header, one int32 payload, and for batches with
images one float32 pixel tensor.

    header  = [cmd, num_tokens T, num_seqs B, max_seqlen, position_rows P, num_images I,
               pixel_rows R, pixel_row_len C]                                         int64 [8]
    payload = input_ids [T] | positions [P*T] | cu_seqlens [B+1] | image_grid_thw [I*3]  int32
    pixels  = pixel_values [R, C]                                 float32, only when R > 0

No pickling: all are plain tensors broadcast over the tensor-parallel group. Everything is validated on
rank 0 before anything is sent, so a bad request never reaches a worker.
"""

from enum import IntEnum

import torch

from tp_embed.batch import Batch
from tp_embed.distributed import broadcast, comm_device

HEADER_SIZE = 8


class Cmd(IntEnum):
    NOOP = 0  # heartbeat: keeps an idle worker's wait inside the collective timeout
    FORWARD = 1
    STOP = 2


def send_command(cmd: Cmd) -> None:
    header = torch.zeros(HEADER_SIZE, dtype=torch.int64, device=comm_device())
    header[0] = int(cmd)
    broadcast(header)


def send_batch(batch: Batch) -> None:
    position_rows = 1 if batch.positions.dim() == 1 else batch.positions.shape[0]
    pixel_rows, pixel_row_len = (0, 0) if batch.pixel_values is None else batch.pixel_values.shape
    header = torch.tensor([Cmd.FORWARD, batch.num_tokens, batch.num_seqs, batch.max_seqlen, position_rows,
                           batch.num_images, pixel_rows, pixel_row_len], dtype=torch.int64, device=comm_device())
    broadcast(header)
    parts = [batch.input_ids, batch.positions.reshape(-1), batch.cu_seqlens]
    if batch.num_images:
        parts.append(batch.image_grid_thw.reshape(-1))
    broadcast(torch.cat([p.to(torch.int32) for p in parts]).to(comm_device()))
    if pixel_rows:
        broadcast(batch.pixel_values.to(comm_device(), torch.float32).contiguous())


def recv() -> tuple[Cmd, Batch | None]:
    """Worker side: wait for the next command and, for FORWARD, its batch."""
    header = broadcast(torch.empty(HEADER_SIZE, dtype=torch.int64, device=comm_device())).tolist()
    cmd = Cmd(header[0])
    if cmd != Cmd.FORWARD:
        return cmd, None
    num_tokens, num_seqs, max_seqlen, position_rows, num_images, pixel_rows, pixel_row_len = header[1:]
    sizes = [num_tokens, position_rows * num_tokens, num_seqs + 1, 3 * num_images]
    payload = broadcast(torch.empty(sum(sizes), dtype=torch.int32, device=comm_device()))
    input_ids, positions, cu_seqlens, grid = payload.split(sizes)
    if position_rows > 1:
        positions = positions.view(position_rows, num_tokens)
    pixels = None
    if pixel_rows:
        pixels = broadcast(torch.empty(pixel_rows, pixel_row_len, dtype=torch.float32, device=comm_device()))
    return cmd, Batch(input_ids, positions, cu_seqlens, max_seqlen, pixels,
                      grid.view(num_images, 3) if num_images else None)
