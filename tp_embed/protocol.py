"""What rank 0 sends the workers: a fixed-size int64 header, one int32 payload, and for batches with
images one float32 pixel tensor.

    header  = [cmd, num_tokens T, num_seqs B, max_seqlen, position_rows P, num_images I,
               pixel_rows R, pixel_row_len C, type_rows S, output O]                  int64 [10]
    payload = input_ids [T] | positions [P*T] | cu_seqlens [B+1] | image_grid_thw [I*3]
              | token_type_ids [S*T]                                                  int32
    pixels  = pixel_values [R, C]                                 float32, only when R > 0

No pickling: all are plain tensors broadcast over the tensor-parallel group. With --dp > 1, global
rank 0 sends the same messages to another group's leader over their pair group, and the leader answers
with the pooled float32 [B, dim] rows, or a token head's [T, width] for a batch whose output O asks for
one (`send_pooled` / `recv_pooled`). Everything is validated on
rank 0 before anything is sent, so a bad request never reaches a worker.
"""

from enum import IntEnum

import torch

from tp_embed.batch import Batch
from tp_embed.distributed import broadcast, comm_device

HEADER_SIZE = 10


class Cmd(IntEnum):
    NOOP = 0  # heartbeat: keeps an idle worker's wait inside the collective timeout
    FORWARD = 1
    STOP = 2


def send_command(cmd: Cmd, group=None, src: int | None = None) -> None:
    """To this rank's tensor-parallel group, or with `group`, over a leader's pair group from `src`."""
    header = torch.zeros(HEADER_SIZE, dtype=torch.int64, device=comm_device())
    header[0] = int(cmd)
    broadcast(header, src, group)


def send_batch(batch: Batch, group=None, src: int | None = None) -> None:
    position_rows = 1 if batch.positions.dim() == 1 else batch.positions.shape[0]
    pixel_rows, pixel_row_len = (0, 0) if batch.pixel_values is None else batch.pixel_values.shape
    type_rows = int(batch.token_type_ids is not None)
    header = torch.tensor([Cmd.FORWARD, batch.num_tokens, batch.num_seqs, batch.max_seqlen, position_rows,
                           batch.num_images, pixel_rows, pixel_row_len, type_rows, batch.output],
                          dtype=torch.int64, device=comm_device())
    broadcast(header, src, group)
    parts = [batch.input_ids, batch.positions.reshape(-1), batch.cu_seqlens]
    if batch.num_images:
        parts.append(batch.image_grid_thw.reshape(-1))
    if type_rows:
        parts.append(batch.token_type_ids)
    broadcast(torch.cat([p.to(torch.int32) for p in parts]).to(comm_device()), src, group)
    if pixel_rows:
        broadcast(batch.pixel_values.to(comm_device(), torch.float32).contiguous(), src, group)


def recv(group=None, src: int | None = None) -> tuple[Cmd, Batch | None]:
    """Worker side: wait for the next command and, for FORWARD, its batch (from this rank's group
    leader, or with `group`, from global rank `src` over a leader's pair group)."""
    header = broadcast(torch.empty(HEADER_SIZE, dtype=torch.int64, device=comm_device()), src, group).tolist()
    cmd = Cmd(header[0])
    if cmd != Cmd.FORWARD:
        return cmd, None
    (num_tokens, num_seqs, max_seqlen, position_rows, num_images, pixel_rows, pixel_row_len, type_rows,
     output) = header[1:]
    sizes = [num_tokens, position_rows * num_tokens, num_seqs + 1, 3 * num_images, type_rows * num_tokens]
    payload = broadcast(torch.empty(sum(sizes), dtype=torch.int32, device=comm_device()), src, group)
    input_ids, positions, cu_seqlens, grid, token_types = payload.split(sizes)
    if position_rows > 1:
        positions = positions.view(position_rows, num_tokens)
    pixels = None
    if pixel_rows:
        pixels = broadcast(torch.empty(pixel_rows, pixel_row_len, dtype=torch.float32, device=comm_device()),
                           src, group)
    return cmd, Batch(input_ids, positions, cu_seqlens, max_seqlen, pixels,
                      grid.view(num_images, 3) if num_images else None, token_types if type_rows else None, output)


def send_pooled(pooled: torch.Tensor, group, src: int) -> None:
    """A group leader returns its batch's pooled rows to global rank 0."""
    broadcast(pooled.to(comm_device(), torch.float32).contiguous(), src, group)


def recv_pooled(num_rows: int, dim: int, group, src: int) -> torch.Tensor:
    return broadcast(torch.empty(num_rows, dim, dtype=torch.float32, device=comm_device()), src, group).cpu()
