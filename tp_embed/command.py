"""The `tp-embed` command (also `python -m tp_embed`): start the server's ranks on this host and supervise them.

It starts what `torchrun --standalone --nproc-per-node N -m tp_embed.launch FLAGS` starts on one host, N = --tp x
--dp processes of tp_embed.launch with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and a free MASTER_PORT on
loopback, but treats a signal the way the server does: SIGINT (Ctrl-C) or SIGTERM goes to rank 0 alone, which
finishes the requests it holds and then stops the workers, and the command exits with the ranks' status, 0
after a clean drain (torchrun signals every rank and exits with a traceback). If rank 0 fails, the other
ranks are killed at once; if a worker fails, or rank 0 exits cleanly, the ranks still running get a grace
period and are then killed. Each rank is asked to get SIGTERM if
this process dies (workers ignore it; rank 0 drains and then stops them), so none outlives it for long.
"""

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from tp_embed.args import parse_with_config
from tp_embed.launch import build_parser

COMMAND_DOC = """Start the tp-embed server on this host: --tp x --dp ranks of tp_embed.launch with these flags
(on a GPU host one GPU a rank). SIGINT or SIGTERM drains it: rank 0 finishes the requests it holds (for at
most --shutdown-timeout), stops the workers, and the command exits 0.

    tp-embed                                             # the embedded all-MiniLM-L6-v2, one rank
    tp-embed --model-path intfloat/e5-mistral-7b-instruct --tp 4 --port 8000
    tp-embed --config Qwen3-Embedding-8B --tp 2 --dp 2

Across several hosts, run torchrun on each with `-m tp_embed.launch` and the same flags (docs/deployment.md).
"""
# after rank 0 exits (or a rank fails and rank 0 was told to stop), how long the other ranks get beyond
# --shutdown-timeout before they are killed
GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port free on loopback now, for the ranks' rendezvous (MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, base: dict | None = None) -> dict:
    """The environment torchrun gives a rank of a single-host job."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def exit_status(codes: list[int]) -> int:
    """The command's status: the first rank's non-zero status (128 + n for a rank killed by signal n), else 0."""
    for code in codes:
        if code != 0:
            return 128 - code if code < 0 else code
    return 0


def _die_with_parent() -> None:
    """In each child before exec: SIGTERM when this process dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the ranks may outlive a killed command
        pass


def start_ranks(argv: list[str], world_size: int) -> list[subprocess.Popen]:
    port = free_port()
    command = [sys.executable, "-m", "tp_embed.launch", *argv]
    # each rank in a session of its own: a terminal's Ctrl-C reaches only this command, which passes one
    # SIGTERM to rank 0
    return [subprocess.Popen(command, env=rank_env(rank, world_size, port), start_new_session=True,
                             preexec_fn=_die_with_parent)
            for rank in range(world_size)]


def supervise(ranks: list[subprocess.Popen], grace_s: float, poll_s: float = 0.1) -> int:
    """Wait for every rank; on SIGINT/SIGTERM ask rank 0 to drain. Once rank 0 has exited cleanly (its
    workers then have STOP) or a worker has failed (rank 0 is asked to drain), the others get grace_s, then
    are killed; once rank 0 has failed, at once: no worker can finish anything without it (they would
    wait on it until --dist-timeout). Returns exit_status of the ranks."""
    rank0 = ranks[0]

    def stop_rank0(signum=None, frame=None) -> None:
        if rank0.poll() is None:
            rank0.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop_rank0) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = None
        while True:
            codes = [r.poll() for r in ranks]
            if all(c is not None for c in codes):
                return exit_status(codes)
            if deadline is None and (codes[0] is not None or any(c not in (None, 0) for c in codes)):
                stop_rank0()
                deadline = time.monotonic() + grace_s
            if codes[0] not in (None, 0) or (deadline is not None and time.monotonic() > deadline):
                for r in ranks:
                    if r.poll() is None:
                        r.kill()
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # parsed here first (presets included): a mistake is reported before any rank starts
    args: argparse.Namespace = parse_with_config(build_parser(COMMAND_DOC, prog="tp-embed"), argv)
    ranks = start_ranks(argv, args.tp * args.dp)
    return supervise(ranks, args.shutdown_timeout + GRACE_S)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
