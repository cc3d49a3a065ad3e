"""--host-allocator: which malloc a rank runs on, and the re-execution that preloads tcmalloc."""

import os
import subprocess
import sys

import pytest

from tp_embed import host_allocator
from tp_embed.host_allocator import active_allocator, find_tcmalloc, plan, setup_host_allocator

LIB = "libtcmalloc_minimal.so.4"


@pytest.mark.parametrize("choice, on_cpu, active, tcmalloc, reexecuted, expected", [
    ("auto", True, "glibc", LIB, False, "preload"),
    ("auto", False, "glibc", LIB, False, "glibc"),  # CUDA: the host allocator is not on the hot path
    ("auto", True, "glibc", None, False, "glibc"),  # not installed: glibc, flat
    ("auto", True, "glibc", LIB, True, "glibc"),  # re-executed but still glibc: never loop
    ("glibc", True, "glibc", LIB, False, "glibc"),
    ("tcmalloc", False, "glibc", LIB, False, "preload"),
    ("auto", True, "tcmalloc", None, True, "keep"),  # after our re-execution
    ("glibc", True, "jemalloc", None, False, "keep"),  # the user's LD_PRELOAD wins
])
def test_plan(choice, on_cpu, active, tcmalloc, reexecuted, expected):
    assert plan(choice, on_cpu, active, tcmalloc, reexecuted) == expected


@pytest.mark.parametrize("reexecuted, why", [(False, "was not found"), (True, "did not load")])
def test_plan_refuses_required_tcmalloc_it_cannot_have(reexecuted, why):
    tcmalloc = None if not reexecuted else LIB
    with pytest.raises(ValueError, match=f"tcmalloc: it {why}.*apt install libtcmalloc-minimal4.*glibc"):
        plan("tcmalloc", True, "glibc", tcmalloc, reexecuted)


@pytest.mark.skipif(bool(os.environ.get("LD_PRELOAD")), reason="this process runs with a preloaded library")
def test_this_process_runs_on_glibc():
    assert active_allocator() == "glibc"


def test_setup_without_tcmalloc_fixes_the_glibc_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(host_allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(host_allocator, "active_allocator", lambda: "glibc")
    monkeypatch.setattr(host_allocator, "limit_glibc_mmap_threshold", lambda: calls.append("mallopt"))
    monkeypatch.delenv(host_allocator.REEXEC_MARK, raising=False)
    assert setup_host_allocator("auto", on_cpu=True) == "glibc"
    assert calls == ["mallopt"]
    with pytest.raises(ValueError, match="was not found"):
        setup_host_allocator("tcmalloc", on_cpu=True)


@pytest.mark.parametrize("reexecuted, why", [(False, "tcmalloc not found"),
                                              (True, "tcmalloc (libtcmalloc_minimal.so.4) did not load")])
def test_auto_warning_says_why_it_stays_on_glibc(monkeypatch, caplog, reexecuted, why):
    """Not installed, or found and preloaded but not loaded (a broken library): the message tells which."""
    monkeypatch.setattr(host_allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(host_allocator, "active_allocator", lambda: "glibc")
    monkeypatch.setattr(host_allocator, "limit_glibc_mmap_threshold", lambda: None)
    monkeypatch.setenv("RANK", "0")
    if reexecuted:
        monkeypatch.setenv(host_allocator.REEXEC_MARK, "1")
        monkeypatch.setenv("LD_PRELOAD", "libtcmalloc_minimal.so.4")
    else:
        monkeypatch.delenv(host_allocator.REEXEC_MARK, raising=False)
        monkeypatch.setattr(host_allocator, "find_tcmalloc", lambda: None)
    with caplog.at_level("INFO", logger="tp_embed"):
        assert setup_host_allocator("auto", on_cpu=True) == "glibc"
    assert why in caplog.text and "apt install libtcmalloc-minimal4" in caplog.text
    assert ("not found" in caplog.text) != reexecuted
    # missing is a note; found and not loaded (a broken library) is a warning
    (record,) = [r for r in caplog.records if "glibc malloc" in r.getMessage()]
    assert record.levelname == ("WARNING" if reexecuted else "INFO")


def run_setup(choice: str) -> subprocess.CompletedProcess:
    code = ("import os; from tp_embed.host_allocator import setup_host_allocator as s; "
            f"print(s({choice!r}, True), os.environ.get('LD_PRELOAD', ''))")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_allocator.REEXEC_MARK)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed (apt install libtcmalloc-minimal4)")
def test_auto_reexecutes_onto_tcmalloc():
    """The real thing: the process replaces itself, comes back with tcmalloc loaded, and stops there."""
    result = run_setup("auto")
    assert result.returncode == 0, result.stderr
    allocator, preload = result.stdout.split()
    assert allocator == "tcmalloc" and "tcmalloc" in preload


def test_glibc_choice_stays_on_glibc():
    result = run_setup("glibc")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["glibc"]
