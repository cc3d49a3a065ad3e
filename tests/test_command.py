"""The `tp-embed` command (tp_embed/command.py): the ranks' environment, the exit status, supervision of
stand-in ranks, and the real server started with `python -m tp_embed` outside the checkout."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from server_utils import ServerProcess
from tp_embed import command


def test_rank_env_is_torchruns_for_one_host():
    env = command.rank_env(2, 4, 29555, base={"KEEP": "1", "RANK": "9"})
    assert env == {"KEEP": "1", "RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                   "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}


def test_free_port_can_be_bound():
    import socket
    port = command.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("codes, status", [([0, 0, 0], 0), ([0, 3, 0], 3), ([2, 1], 2), ([-9, 0], 137),
                                           ([0, -15], 143)])
def test_exit_status_is_the_first_failure(codes, status):
    assert command.exit_status(codes) == status


def test_flag_mistakes_exit_2_before_any_rank_starts(monkeypatch, capsys):
    monkeypatch.setattr(command, "start_ranks", lambda *a: pytest.fail("a rank was started"))
    for argv in (["--tp", "0"], ["--dp", "0"], ["--no-such-flag"], ["--config", "/nonexistent.json"]):
        with pytest.raises(SystemExit) as e:
            command.main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("usage: tp-embed")


def test_world_size_is_tp_times_dp_from_flags_and_presets(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(command, "start_ranks", lambda argv, n: started.append((argv, n)) or ["ranks"])
    monkeypatch.setattr(command, "supervise", lambda ranks, grace_s: 0)
    assert command.main(["--tp", "2", "--dp", "3"]) == 0
    preset = tmp_path / "p.json"
    preset.write_text('{"tp": 4}')
    assert command.main(["--config", str(preset)]) == 0
    assert started == [(["--tp", "2", "--dp", "3"], 6), (["--config", str(preset)], 4)]


# Stand-in ranks for supervise(): rank 0 exits 0 on SIGTERM (as the server does after draining); a worker
# ignores SIGTERM and exits when rank 0 is gone (as a worker does on STOP).
RANK0 = ("import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
         "time.sleep(float(sys.argv[1]))\n"
         "sys.exit(int(sys.argv[2]))\n")
WORKER = ("import os, signal, sys, time\n"
          "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          "end = time.monotonic() + float(sys.argv[2])\n"
          "while time.monotonic() < end:\n"
          "    if os.getppid() != int(sys.argv[3]) or not os.path.exists(sys.argv[1]):\n"
          "        break\n"
          "    time.sleep(0.02)\n"
          "sys.exit(int(sys.argv[4]))\n")


def stand_ins(tmp_path, rank0_s, rank0_code, worker_s, worker_code, hang=False):
    """rank 0 runs rank0_s then exits rank0_code; the worker exits worker_code after worker_s or as soon as
    rank 0's marker file is removed (unless hang: then it waits out worker_s whatever happens)."""
    alive = tmp_path / "rank0-alive"
    alive.write_text("")
    rank0 = subprocess.Popen([sys.executable, "-c", RANK0, str(rank0_s), str(rank0_code)])
    marker = str(alive) if not hang else sys.executable  # a path that never disappears
    worker = subprocess.Popen([sys.executable, "-c", WORKER, marker, str(worker_s), str(os.getpid()),
                               str(worker_code)])

    def remove_marker_when_rank0_exits():
        rank0.wait()
        alive.unlink(missing_ok=True)

    threading.Thread(target=remove_marker_when_rank0_exits, daemon=True).start()
    return [rank0, worker]


def test_supervise_returns_0_when_every_rank_exits_0(tmp_path):
    assert command.supervise(stand_ins(tmp_path, 0.3, 0, 30, 0), grace_s=20) == 0


def test_a_failed_worker_stops_rank_0_and_sets_the_status(tmp_path):
    t0 = time.monotonic()
    ranks = stand_ins(tmp_path, 30, 0, 0.3, 3)
    assert command.supervise(ranks, grace_s=20) == 3
    assert ranks[0].returncode == 0  # asked to stop with SIGTERM, long before its 30 s
    assert time.monotonic() - t0 < 15


def test_ranks_left_after_rank_0_exits_are_killed_after_the_grace_period(tmp_path):
    t0 = time.monotonic()
    ranks = stand_ins(tmp_path, 0.3, 0, 60, 0, hang=True)
    assert command.supervise(ranks, grace_s=1.0) == 128 + signal.SIGKILL
    assert ranks[1].returncode == -signal.SIGKILL
    assert 1.0 < time.monotonic() - t0 < 15


def test_a_failed_rank_0_ends_the_workers_at_once(tmp_path):
    """rank 0 failing (a port in use, a bad flag) leaves workers waiting on it: they are killed without the
    grace period."""
    t0 = time.monotonic()
    ranks = stand_ins(tmp_path, 0.3, 2, 60, 0, hang=True)
    assert command.supervise(ranks, grace_s=60) == 2
    assert ranks[1].returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 15


def test_sigint_to_the_command_asks_rank_0_alone_to_stop(tmp_path):
    ranks = stand_ins(tmp_path, 60, 0, 60, 0)
    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    assert command.supervise(ranks, grace_s=20) == 0
    assert time.monotonic() - t0 < 15
    assert [r.returncode for r in ranks] == [0, 0]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_python_m_tp_embed_serves_at_tp_2_and_drains_on_ctrl_c(tmp_path):
    """The installed command, run outside the checkout: two ranks, one embedding, then SIGINT to the command
    (a terminal's Ctrl-C) drains and exits 0 with every rank gone and no traceback."""
    launcher = [sys.executable, "-m", "tp_embed", "--tp", "2"]
    with ServerProcess([], nproc=2, log_path=tmp_path / "command.log", launcher=launcher,
                       cwd=str(tmp_path)) as server:
        r = server.post("/v1/embeddings", {"input": ["hello there", "a second input"]})
        assert r.status_code == 200, r.text
        vectors = np.array([d["embedding"] for d in r.json()["data"]])
        assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        pids = [server.rank_pid(0), server.rank_pid(1)]
        server.proc.send_signal(signal.SIGINT)
        assert server.wait(60) == 0, server.log()[-3000:]
        log = server.log()
    assert "SIGTERM: draining" in log and "Traceback" not in log, log[-3000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
