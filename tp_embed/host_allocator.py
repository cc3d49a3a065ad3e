"""The host allocator of a rank process: tcmalloc on the CPU when it is installed, else glibc kept flat.

On the CPU every activation of the forward pass is a host allocation, and the allocator decides both the
speed and whether memory stays flat under load (docs/performance.md, all-MiniLM-L6-v2 on 2 cores):

- glibc with its defaults raises its mmap threshold as large blocks are freed, then serves them from heaps
  it never gives back: rank 0's RSS grew 45-97% in a 64-client soak.
- glibc with a fixed 128 KiB mmap threshold keeps memory flat, but every activation is then a fresh mmap,
  paid for in page faults: the forward pass runs 1.3-1.6x slower than with tcmalloc.
- tcmalloc reuses freed activations and kept RSS within the soak's limit.

A library can only replace malloc from the start of a process, so with tcmalloc chosen and not yet loaded
the rank re-executes itself once with it in LD_PRELOAD (same pid, so torchrun is unaffected).
"""

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger("tp_embed")

REEXEC_MARK = "TP_EMBED_ALLOCATOR_REEXEC"  # set in the re-executed process: never re-execute twice
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")  # Debian: libtcmalloc-minimal4, gperftools' full one
INSTALL_HINT = ("install it with `apt install libtcmalloc-minimal4` (Debian, Ubuntu), `dnf install "
                "gperftools-libs` (Fedora) or `conda install gperftools`")
# a symbol only each allocator exports, looked up in the process's global scope
ALLOCATOR_SYMBOLS = {"tcmalloc": "tc_malloc", "jemalloc": "mallctl", "mimalloc": "mi_malloc"}


def active_allocator() -> str:
    """The malloc this process runs on: tcmalloc, jemalloc or mimalloc (preloaded), glibc, or unknown."""
    process = ctypes.CDLL(None)
    for name, symbol in ALLOCATOR_SYMBOLS.items():
        if hasattr(process, symbol):
            return name
    return "glibc" if hasattr(process, "gnu_get_libc_version") else "unknown"


def runs_on_cpu(device: str | None) -> bool:
    """Whether a rank given --device `device` (None: CUDA when available) computes on the CPU. torch is
    imported only where a GPU driver's device node is present (NVIDIA's /dev/nvidiactl, ROCm's /dev/kfd),
    so a CPU host chooses its allocator before torch loads."""
    if device is not None:
        return device == "cpu"
    if not any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/kfd")):
        return True
    import torch
    return not torch.cuda.is_available()


def find_tcmalloc() -> str | None:
    """tcmalloc's library name as the dynamic loader finds it (e.g. libtcmalloc_minimal.so.4), or None."""
    for name in TCMALLOC_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def plan(choice: str, on_cpu: bool, active: str, tcmalloc: str | None, reexecuted: bool) -> str:
    """What to do about the allocator, for --host-allocator `choice` (auto, tcmalloc or glibc):

    "keep"    another allocator is already loaded (LD_PRELOAD by the user, or our re-execution): use it
    "preload" re-execute with `tcmalloc` in LD_PRELOAD
    "glibc"   stay on glibc and fix its mmap threshold
    Raises ValueError when tcmalloc was asked for and cannot be had."""
    if active != "glibc":
        return "keep"
    wants_tcmalloc = choice == "tcmalloc" or (choice == "auto" and on_cpu)
    if not wants_tcmalloc:
        return "glibc"
    if tcmalloc is not None and not reexecuted:
        return "preload"
    if choice == "tcmalloc":
        why = "it did not load from LD_PRELOAD" if reexecuted else "it was not found"
        raise ValueError(f"--host-allocator tcmalloc: {why}; {INSTALL_HINT}, or pass --host-allocator glibc")
    return "glibc"


def reexec_with_preload(library: str) -> None:
    """Replace this process with the same command line, `library` first in LD_PRELOAD. Does not return."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    env[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def limit_glibc_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """A fixed mmap threshold keeps large buffers (request bodies, tensors, responses) in mmap, returned
    to the OS on free: rank 0's RSS stayed within 1-2% in the 64-client soak, against 45-97% growth
    with glibc's rising threshold."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, threshold)


def setup_host_allocator(choice: str, on_cpu: bool) -> str:
    """Apply --host-allocator for this rank and return the allocator it runs on. May re-execute the
    process (see the module docstring); raises ValueError when tcmalloc was required and is missing."""
    active = active_allocator()
    tcmalloc = find_tcmalloc() if active == "glibc" else None
    action = plan(choice, on_cpu, active, tcmalloc, reexecuted=REEXEC_MARK in os.environ)
    if action == "preload":
        reexec_with_preload(tcmalloc)
    if action == "glibc":
        limit_glibc_mmap_threshold()
        if choice == "auto" and on_cpu and int(os.environ.get("RANK", "0")) == 0:
            # not installed is a note (info); found, preloaded and still not loaded is a broken library (warning)
            level, why = logging.INFO, "tcmalloc not found"
            if REEXEC_MARK in os.environ:
                level = logging.WARNING
                why = f"tcmalloc ({os.environ.get('LD_PRELOAD', '').split(':')[0]}) did not load from LD_PRELOAD"
            logger.log(level, "%s: running on glibc malloc, whose flat-memory setting makes the CPU forward pass "
                       "about 1.4x slower; %s", why, INSTALL_HINT)
        return "glibc"
    return active
