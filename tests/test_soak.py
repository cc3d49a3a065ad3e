"""benchmarks/soak.py: its arithmetic, its flags, a short real soak (8 clients, 10 s, tp=1, the tiny Mistral),
and that it fails when the vectors are wrong (a running server, the reference of another model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_utils import ServerProcess
from tiny_models import make_mistral

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import soak  # noqa: E402


def run_soak(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_rss_growth_compares_the_first_and_last_windows():
    samples = [(float(t), 100 if t < 10 else 110 if t < 50 else 120) for t in range(61)]  # one a second
    growth = soak.rss_growth(samples, duration=60, window=10)
    assert growth["rss_first_window_kb"] == 100  # t = 0..9
    assert growth["rss_last_window_kb"] == 120  # t = 50..60
    assert growth["rss_growth"] == pytest.approx(0.2)
    assert soak.rss_growth([], duration=60, window=10)["rss_growth"] is None


def test_summarise_counts_and_percentiles():
    ok = [soak.Record((i + 1) / 100, 4, "200", mismatches=0, min_cosine=1.0) for i in range(100)]
    ok[7].mismatches, ok[7].min_cosine = 2, 0.5
    bad = [soak.Record(0.001, 3, "429"), soak.Record(0.001, 3, "429"), soak.Record(5.0, 1, "ReadTimeout")]
    s = soak.summarise(ok + bad, wall_s=10.0)
    assert (s["requests"], s["ok"], s["errors"]) == (103, 100, {"429": 2, "ReadTimeout": 1})
    assert (s["vectors_checked"], s["mismatches"], s["min_cosine"]) == (400, 2, 0.5)
    assert s["latency_p50_ms"] == pytest.approx(505.0)  # 10..1000 ms; the errors are left out
    assert s["latency_p99_ms"] == pytest.approx(990.1)
    assert (s["requests_per_s"], s["inputs_per_s"]) == (10.0, 40.0)


def test_failures_name_errors_mismatches_and_rss_growth():
    passing = {"ok": 5, "errors": {}, "mismatches": 0, "rss_growth": 0.099}
    assert soak.failures(passing, max_rss_growth=0.10) == []
    assert soak.failures(dict(passing, rss_growth=None), max_rss_growth=0.10) == []  # not measured
    reasons = soak.failures({"ok": 5, "errors": {"503": 2}, "mismatches": 3, "rss_growth": 0.10}, 0.10)
    assert len(reasons) == 3 and "2 requests failed" in reasons[0] and "3 vectors" in reasons[1]
    assert "10.0%" in reasons[2]
    assert soak.failures(dict(passing, ok=0), 0.10) == ["no request succeeded"]


def test_rank0_pid_and_rss_of_a_process():
    log = "INFO rank 1 of 2: pid 42\nINFO rank 0 of 2: pid 4242\nlistening on http://127.0.0.1:1 (rank 0, pid 4242)"
    assert soak.rank0_pid(log) == 4242 and soak.rank0_pid("nothing") is None
    assert 1000 < soak.read_rss_kb(os.getpid()) < 64 * 2 ** 20  # this interpreter: over 1 MiB, under 64 GiB


def test_every_flag_has_help_and_bad_flags_are_refused(capsys):
    for action in soak.build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    for flags in (["--clients", "0"], ["--duration", "10", "--rss-window", "6"], ["--max-inputs", "300"],
                  ["--min-words", "5", "--max-words", "4"]):
        with pytest.raises(SystemExit):
            soak.parse_args(flags)
        assert f"error: {flags[-2]} " in capsys.readouterr().err


def test_a_short_soak_passes(tiny_mistral_dir, tmp_path):
    out = tmp_path / "soak.json"
    # RSS still grows while a fresh server warms up in 10 s: the limit here is loose; the verdict's
    # arithmetic is tested above, the 60 s soak of docs/reliability.md uses the default 10%
    proc = run_soak("--model-path", tiny_mistral_dir, "--tp", "1", "--clients", "8", "--duration", "10",
                    "--rss-window", "3", "--num-texts", "64", "--max-rss-growth", "1.0", "--work-dir", str(tmp_path),
                    "--output-json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] > 8 and result["ok"] == result["requests"] and result["errors"] == {}
    assert result["vectors_checked"] >= result["requests"] and result["mismatches"] == 0
    assert result["min_cosine"] >= 0.99999
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"]
    assert result["rss_start_kb"] > 0 and result["rss_end_kb"] > 0 and result["rss_growth"] is not None
    assert 8 <= len(result["rss_samples"]) <= 12  # one a second for 10 s
    assert result["server_exit_code"] == 0 and result["failures"] == []
    assert "PASS" in proc.stdout and "latency p99" in proc.stdout


def test_wrong_vectors_fail_the_soak(tiny_mistral_dir, tmp_path):
    """Attached to a running server (--base-url, --server-log) with the reference of another random model:
    every vector is a mismatch and the exit status is 1."""
    other = make_mistral(str(tmp_path / "other"), seed=1, num_key_value_heads=2)
    log = tmp_path / "server.log"
    with ServerProcess(["--model-path", tiny_mistral_dir], nproc=1, log_path=log) as server:
        out = tmp_path / "soak.json"
        proc = run_soak("--base-url", server.url, "--server-log", str(log), "--model-path", other,
                        "--clients", "2", "--duration", "4", "--rss-window", "2", "--num-texts", "16",
                        "--max-inputs", "4", "--work-dir", str(tmp_path), "--output-json", str(out))
        assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
        result = json.loads(out.read_text())
        assert result["ok"] > 0 and result["mismatches"] == result["vectors_checked"]
        assert result["rss_start_kb"] > 0  # the pid came from --server-log
        assert "FAIL" in proc.stdout and "differ from the offline reference" in proc.stdout
