"""tp-embed's server: every rank runs this module, started by torchrun or by the `tp-embed` command.

    tp-embed --model-path intfloat/e5-mistral-7b-instruct --tp 2    # starts the tp x dp ranks itself
    torchrun --standalone --nproc-per-node 2 -m tp_embed.launch --model-path intfloat/e5-mistral-7b-instruct --tp 2
    torchrun --standalone --nproc-per-node 1 launch.py              # from a checkout: the embedded all-MiniLM-L6-v2
    torchrun --standalone --nproc-per-node 4 launch.py --config gte-Qwen2-7B-instruct

Rank 0 serves the OpenAI embeddings API (--host, --port) and runs the engine thread; the other ranks
hold their shards and run every batch rank 0 broadcasts. SIGTERM or SIGINT to rank 0 (or to torchrun,
which forwards it) drains the queue, stops the workers and exits 0 on every rank.
"""

import argparse
import logging
import os
import signal

# nothing here imports torch before setup_host_allocator, which may re-execute the rank with tcmalloc
# preloaded: torch and transformers (about 2 s of imports) then load once, in the process that runs
from tp_embed.args import add_engine_args, add_server_args, parse_with_config
from tp_embed.host_allocator import runs_on_cpu, setup_host_allocator

logger = logging.getLogger("tp_embed")


def build_parser(description: str = __doc__, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    add_server_args(p)
    return p


def wait_for_rank_0_to_report(seconds: float = 15.0) -> None:
    """A worker that exits first on a startup error makes its launcher end rank 0, maybe before rank 0 has
    said what went wrong. So wait until the launcher stops this rank (SIGTERM: rank 0 has exited) or
    `seconds` pass."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigtimedwait({signal.SIGTERM}, seconds)


def run_worker(args) -> int:
    """Ranks 1..N-1: load the shard and run batches until rank 0 sends STOP."""
    from tp_embed.config import ConfigError, EngineConfig
    from tp_embed.distributed import destroy_distributed
    from tp_embed.engine import Engine

    # Rank 0 decides when to stop: it finishes its requests first, then sends STOP. A signal here
    # (torchrun forwards SIGTERM to every rank; Ctrl-C reaches the whole process group) must not kill
    # a worker that rank 0 still needs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = Engine(EngineConfig.from_args(args), show_progress=False)
    except (ConfigError, SystemExit) as e:
        # the same flags and model give rank 0 the same error, and rank 0 reports it: one line, not one a rank
        logger.debug("rank %s: %s", os.environ.get("RANK"), e)
        wait_for_rank_0_to_report()
        return 2
    try:
        engine.run()  # lead its data-parallel group, or follow its leader
    except Exception as e:  # rank 0 died or a collective timed out: the group is broken
        logger.error("rank %d: lost the process group (%s: %s); exiting", engine.dist.rank, type(e).__name__, e)
        logging.shutdown()
        os._exit(1)  # skip destructors that would wait on the broken group
    destroy_distributed()
    return 0


def started_alone(args) -> str | None:
    """Why this process cannot serve on its own: launch.py is one rank, and neither torchrun nor the tp-embed
    command started it (no WORLD_SIZE) though --tp x --dp asks for several."""
    ranks = args.tp * args.dp
    if "WORLD_SIZE" in os.environ or ranks == 1:
        return None
    flags = " ".join(f"--{name} {n}" for name, n in (("tp", args.tp), ("dp", args.dp)) if n > 1)
    return (f"launch.py runs one rank of the server, and {flags} needs {ranks}: start them with "
            f"`tp-embed {flags} ...` (it runs the ranks itself), or with "
            f"`torchrun --nproc-per-node {ranks} launch.py {flags} ...`")


def main(argv: list[str] | None = None) -> int:
    args = parse_with_config(build_parser(), argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    alone = started_alone(args)
    if alone:
        logger.error("%s", alone)
        return 2
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        allocator = setup_host_allocator(args.host_allocator, runs_on_cpu(args.device))  # may re-execute this rank
    except ValueError as e:
        logger.error("%s", e)
        return 2
    logger.info("rank %d of %d: pid %d, %s malloc", rank, world_size, os.getpid(), allocator)
    if rank != 0:
        return run_worker(args)
    from tp_embed.distributed import destroy_distributed
    from tp_embed.server import serve

    code = serve(args)
    if code != 0:
        logging.shutdown()
        os._exit(code)  # the process group may be broken: don't wait on it in destructors
    destroy_distributed()
    return 0


if __name__ == "__main__":
    code = main()
    from tp_embed.distributed import exit_process
    exit_process(code)
