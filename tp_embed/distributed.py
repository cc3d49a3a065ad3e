"""Process groups and the few collectives the model uses.

The world of dp x tp ranks is split into dp tensor-parallel groups of tp consecutive ranks (so a group
stays inside a node when torchrun gives each node a multiple of tp processes). Group g's rank 0 (global
rank g*tp, its *leader*) broadcasts batches to its group. Global rank 0 leads group 0, serves HTTP, and
reaches each other leader through a two-rank group {0, g*tp}.

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
    dp_rank: int = 0  # which tensor-parallel group this rank belongs to
    dp_size: int = 1
    tp_leader: int = 0  # global rank of this group's tp rank 0: the source of its broadcasts
    leader_group: object = None  # on a leader of group g >= 1: the group {0, g*tp}
    leader_groups: tuple = ()  # on global rank 0: the group {0, g*tp} of each g >= 1, in order


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
                     timeout_s: float = 600.0, dp: int = 1) -> ParallelState:
    """Set up the process groups from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL when the ranks compute on CUDA, gloo on CPU; `backend` overrides (gloo with CUDA tensors is how
    the sharded CUDA path runs on a single GPU). Without torchrun's environment and tp == dp == 1 this
    sets up a single process with no process group at all.
    """
    global _STATE
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if world_size != tp * dp:
        flags = f"--dp {dp} --tp {tp}" if dp > 1 else f"--tp {tp}"
        need = f"--dp {dp} x --tp {tp} = {tp * dp}" if dp > 1 else flags
        raise SystemExit(
            f"{need} needs exactly {tp * dp} processes, but torchrun started {world_size}: "
            f"run `torchrun --nproc-per-node {tp * dp} launch.py ... {flags}`, or the server as "
            f"`tp-embed ... {flags}`, which starts them itself")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        _STATE = ParallelState(0, 1, 0, 0, 1, None, dev, "none")
        return _STATE
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if backend == "nccl" else None)
    dp_rank, tp_rank_ = divmod(rank, tp)
    if dp == 1:
        _STATE = ParallelState(rank, world_size, local_rank, rank, world_size, dist.group.WORLD, dev, backend)
        return _STATE
    # every rank creates every group, in the same order (new_group is collective over the world)
    tp_groups = [dist.new_group(list(range(g * tp, (g + 1) * tp))) for g in range(dp)]
    pair_groups = [dist.new_group([0, g * tp]) for g in range(1, dp)]
    leader_group = pair_groups[dp_rank - 1] if dp_rank > 0 and tp_rank_ == 0 else None
    _STATE = ParallelState(rank, world_size, local_rank, tp_rank_, tp, tp_groups[dp_rank], dev, backend,
                           dp_rank=dp_rank, dp_size=dp, tp_leader=dp_rank * tp, leader_group=leader_group,
                           leader_groups=tuple(pair_groups) if rank == 0 else ())
    return _STATE


def destroy_distributed() -> None:
    """Tear the process groups down together: a rank that leaves while a peer still talks to it can
    abort the peer's gloo threads, so every rank meets at a barrier first."""
    global _STATE
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _STATE = ParallelState(0, 1, 0, 0, 1, None, _STATE.device, "none")


def exit_process(code: int) -> None:
    """Flush and leave without interpreter teardown. After the groups are destroyed, torch's C++
    threads (gloo's, the TCP store's) can still abort the process from static destructors ("terminate
    called without an active exception"), turning a finished run into a SIGABRT."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """[rows, cols] on each rank -> [rows, tp * cols] on every rank: the ranks' tensors side by side, in
    rank order (a vocab-parallel head's columns made whole)."""
    if _STATE.tp_size == 1:
        return x
    send = x.to(comm_device()).contiguous()  # gloo gathers host tensors: the one-GPU tp>1 test path copies
    parts = [torch.empty_like(send) for _ in range(_STATE.tp_size)]
    dist.all_gather(parts, send, group=_STATE.tp_group)
    return torch.cat(parts, dim=-1).to(x.device)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """The elementwise largest of each rank's `x` over the tensor-parallel group (a new tensor on x's device)."""
    if _STATE.tp_size == 1:
        return x
    t = x.to(comm_device()).contiguous().clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_STATE.tp_group)
    return t.to(x.device)


def all_reduce_min(value: int) -> int:
    """The smallest of each rank's `value` over the tensor-parallel group (ranks agreeing on a limit)."""
    if _STATE.tp_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.tp_group)
    return int(t.item())


def broadcast(x: torch.Tensor, src: int | None = None, group=None) -> torch.Tensor:
    """Broadcast `x` in place: by default from this tensor-parallel group's leader to the group;
    with `group` (a leader's pair group) from global rank `src`."""
    if group is None:
        if _STATE.tp_size == 1:
            return x
        group, src = _STATE.tp_group, _STATE.tp_leader
    dist.broadcast(x, src=src, group=group)
    return x
