"""Process groups and the few collectives the model uses.

Every helper returns early at tensor-parallel size 1 (Megatron's `mappings.py`), so a single-process run
never touches torch.distributed beyond what it asks for. The state is one small object set once by
`init_distributed` and read by the layers through `tp_rank()` / `tp_size()`.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int  # global rank
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    tp_group: object  # torch.distributed ProcessGroup, or None at world size 1
    device: torch.device
    backend: str  # "nccl", "gloo", or "none" for a single process


_STATE = ParallelState(0, 1, 0, 0, 1, None, torch.device("cpu"), "none")


def state() -> ParallelState:
    return _STATE


def tp_rank() -> int:
    return _STATE.tp_rank


def tp_size() -> int:
    return _STATE.tp_size


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(tp: int, device: str | None = None, backend: str | None = None,
                     timeout_s: float = 600.0) -> ParallelState:
    """Set up the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL when the ranks compute on CUDA, gloo on CPU; `backend` overrides (gloo with CUDA tensors is how
    the sharded CUDA path runs on a single GPU). Without torchrun's environment and tp == 1 this sets up a
    single process with no process group at all.
    """
    global _STATE
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if world_size != tp:
        raise SystemExit(
            f"--tp {tp} needs exactly {tp} processes, but torchrun started {world_size}: "
            f"run `torchrun --nproc-per-node {tp} launch.py ... --tp {tp}`")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        _STATE = ParallelState(0, 1, 0, 0, 1, None, dev, "none")
        return _STATE
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if backend == "nccl" else None)
    _STATE = ParallelState(rank, world_size, local_rank, rank, world_size, dist.group.WORLD, dev, backend)
    return _STATE


def destroy_distributed() -> None:
    """Tear the process group down together: a rank that leaves while a peer still talks to it can
    abort the peer's gloo threads, so every rank meets at a barrier first."""
    global _STATE
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _STATE = ParallelState(0, 1, 0, 0, 1, None, _STATE.device, "none")


def comm_device() -> torch.device:
    """Where tensors must live to be sent: the GPU for NCCL, host memory for gloo."""
    return _STATE.device if _STATE.backend == "nccl" else torch.device("cpu")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group, in place."""
    if _STATE.tp_size == 1:
        return x
    if _STATE.backend == "gloo" and x.device.type != "cpu":
        # gloo reduces host tensors; the one-GPU tp>1 test path pays a copy here.
        host = x.cpu()
        dist.all_reduce(host, group=_STATE.tp_group)
        x.copy_(host)
        return x
    dist.all_reduce(x, group=_STATE.tp_group)
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast `x` from tensor-parallel rank `src` to the group, in place."""
    if _STATE.tp_size == 1:
        return x
    dist.broadcast(x, src=src, group=_STATE.tp_group)
    return x

