"""What rank 0 sends the workers: a fixed-size int64 header, then one int32 payload tensor.

    header  = [cmd, num_tokens, num_seqs, max_seqlen, 0, 0, 0, 0]        int64 [8]
    payload = input_ids [T] | positions [T] | cu_seqlens [B+1]             int32 [2T + B + 1]

No pickling: both are plain tensors broadcast over the tensor-parallel group. Everything is validated on
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
    header = torch.tensor([Cmd.FORWARD, batch.num_tokens, batch.num_seqs, batch.max_seqlen, 0, 0, 0, 0],
                          dtype=torch.int64, device=comm_device())
    broadcast(header)
    payload = torch.cat([batch.input_ids, batch.positions, batch.cu_seqlens]).to(torch.int32)
    broadcast(payload.to(comm_device()))


def recv() -> tuple[Cmd, Batch | None]:
    """Worker side: wait for the next command and, for FORWARD, its batch."""
    header = broadcast(torch.empty(HEADER_SIZE, dtype=torch.int64, device=comm_device())).tolist()
    cmd = Cmd(header[0])
    if cmd != Cmd.FORWARD:
        return cmd, None
    num_tokens, num_seqs, max_seqlen = header[1:4]
    payload = broadcast(torch.empty(2 * num_tokens + num_seqs + 1, dtype=torch.int32, device=comm_device()))
    input_ids, positions, cu_seqlens = payload.split([num_tokens, num_tokens, num_seqs + 1])
    return cmd, Batch(input_ids, positions, cu_seqlens, max_seqlen)
