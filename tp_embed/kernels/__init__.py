"""CPU kernels compiled from C++ on the host that runs them, on first use, and cached.

`varlen_attention.cpp` registers `torch.ops.tp_embed.varlen_attention`. It is compiled with the host's C++
compiler (`$CXX`, else `c++`) for the host's CPU (`-march=native`), against the installed torch's headers,
into `$TP_EMBED_CACHE/kernels` (default `~/.cache/tp_embed/kernels`). The file name carries a hash of the
source, the flags, the compiler, torch's version and the CPU, so a change of any of them builds anew and
a cache directory shared between different machines never hands one a binary built for another.
Processes on one host take turns on the cache directory (an exclusive `flock`), so when the ranks of a
server start on a cold cache one compiles and the others load its binary; the build writes to a temporary
name and renames it into place, so no process ever loads a half-written file.

No compiler, or a failed build: `load_cpu_attention` returns the reason and the callers use PyTorch's ops.
"""

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("varlen_attention.cpp")
CXXFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-std=c++20", "-shared", "-fPIC",
            "-w"]
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict = {}  # "error": why the kernel is unavailable, or "loaded": True


def cache_dir() -> Path:
    root = os.environ.get("TP_EMBED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tp_embed")
    return Path(root) / "kernels"


def cpu_identity() -> str:
    """The CPU model and feature flags (-march=native compiles for exactly these)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "c++")


def build_command(cxx: str, source: Path, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    return [cxx, *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source), "-o", str(output),
            f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(CXXFLAGS), version, torch.__version__,
                                    cpu_identity()]).encode()).hexdigest()[:16]
    return cache_dir() / f"varlen_attention-{key}.so"


def build(cxx: str, output: Path) -> None:
    """Compile into output (its directory exists: build_once made it) through a temporary name."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=output.parent)
    os.close(fd)
    try:
        cmd = build_command(cxx, SOURCE, Path(tmp))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_once(cxx: str, path: Path) -> None:
    """Build `path` unless it is there, holding the cache directory's lock: another process building it
    is waited for (at most its build timeout), then its binary is used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not path.exists():
            logger.info("compiling the CPU attention kernel into %s", path)
            build(cxx, path)
    finally:
        os.close(fd)  # releases the lock


def load_cpu_attention() -> str | None:
    """Build (once per host and source) and load the CPU attention kernel. Returns None when
    `torch.ops.tp_embed.varlen_attention` is ready, else why it is not."""
    with _lock:
        if "loaded" in _state or "error" in _state:
            return _state.get("error")
        try:
            cxx = compiler()
            if cxx is None:
                raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'}) on PATH")
            path = library_path(cxx)
            build_once(cxx, path)
            torch.ops.load_library(str(path))
            _state["loaded"] = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _state["error"] = str(e)
        return _state.get("error")
