"""tp-embed's server from a checkout: `torchrun ... launch.py FLAGS` runs tp_embed.launch on every rank.

    torchrun --standalone --nproc-per-node 2 launch.py --model-path intfloat/e5-mistral-7b-instruct --tp 2
    torchrun --standalone --nproc-per-node 1 launch.py            # the embedded all-MiniLM-L6-v2

Installed, the same server starts with `tp-embed FLAGS` (torchrun with --tp x --dp ranks) or
`torchrun ... -m tp_embed.launch FLAGS`; `tp-embed --help` lists the flags.
"""

# nothing imported here loads torch before setup_host_allocator (tp_embed/launch.py says why)
from tp_embed.launch import build_parser, main  # noqa: F401  (build_parser: for tests and tools)

if __name__ == "__main__":
    code = main()
    from tp_embed.distributed import exit_process
    exit_process(code)
