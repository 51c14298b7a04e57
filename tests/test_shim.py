"""`hangkit rank`, the shim, on this one machine: what it gives its rank, how it passes the rank's
end on, and its relay under hangkit watch. (Across nodes: test_multinode.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import mpiexec

from hangkit.shim import is_helper, relay_paths
from hangkit.shim.rank import gpu_for

HANGKIT = [sys.executable, "-m", "hangkit"]
PRINT_ENV = ("import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'), "
             "os.environ.get('HANGKIT_RELAY'))")


def rank(*argv: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*HANGKIT, "rank", "--", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_the_gpu_of_its_local_rank():
    assert gpu_for({"PALS_LOCAL_RANKID": "2"}) == "2"
    assert gpu_for({"MPI_LOCALRANKID": "1"}) == "1"
    # The local rank-th of the devices already listed (a job given a subset of a node's GPUs).
    assert gpu_for({"PALS_LOCAL_RANKID": "1", "CUDA_VISIBLE_DEVICES": "2,3"}) == "3"
    assert gpu_for({"PALS_LOCAL_RANKID": "1", "CUDA_VISIBLE_DEVICES": "3"}) is None  # kept
    assert gpu_for({}) is None  # not under a launcher: left alone


@pytest.mark.timeout(60)
def test_the_rank_gets_its_gpu_before_it_starts_and_no_relay_without_a_monitor():
    env = {"PALS_LOCAL_RANKID": "3", "HANGKIT_MONITOR": "", "HANGKIT_MONITOR_KEY": ""}
    done = rank(sys.executable, "-c", PRINT_ENV, env=env)
    assert (done.returncode, done.stdout.split()) == (0, ["3", "None"]), done.stderr
    done = subprocess.run([*HANGKIT, "rank", "--no-bind-gpu", "--", sys.executable, "-c",
                           PRINT_ENV], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env, "CUDA_VISIBLE_DEVICES": "7"})
    assert done.stdout.split() == ["7", "None"], done.stderr


@pytest.mark.timeout(60)
def test_exit_code_and_signal_are_the_ranks():
    assert rank(sys.executable, "-c", "raise SystemExit(7)").returncode == 7
    killed = rank(sys.executable, "-c", "import os, signal; os.kill(os.getpid(), 9)")
    assert killed.returncode == 128 + 9, killed.stderr


@pytest.mark.timeout(60)
def test_sigterm_to_the_shim_reaches_the_rank(tmp_path):
    flag = tmp_path / "started"
    program = ("import pathlib, signal, sys\n"
               "signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))\n"
               f"pathlib.Path({str(flag)!r}).touch()\n"
               "signal.pause()\n")
    shim = subprocess.Popen([*HANGKIT, "rank", "--", sys.executable, "-c", program])
    try:
        deadline = time.monotonic() + 50
        while not flag.exists():  # the rank's readiness: its handler is in place
            assert shim.poll() is None and time.monotonic() < deadline, shim.returncode
            time.sleep(0.05)  # ok-sleep: polls for the rank's flag file, with a deadline
        shim.send_signal(signal.SIGTERM)
        assert shim.wait(timeout=30) == 42  # the rank's own exit, after its own handler
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait(timeout=10)


def test_a_command_that_is_not_there_is_one_line_and_exit_2():
    done = rank("no-such-command-hk")
    assert done.returncode == 2
    assert done.stderr == "hangkit: error: command not found: no-such-command-hk\n", done.stderr


def test_shims_and_relays_are_launchers_not_ranks():
    assert is_helper(["/v/bin/python", "/v/bin/hangkit", "rank", "--", "python", "train.py"])
    assert is_helper(["python", "-m", "hangkit", "rank", "--", "python", "train.py"])
    assert is_helper(["python", "-m", "hangkit.shim.relay", "ipc:///tmp/x", "3", "/tmp/x", "9"])
    assert not is_helper(["python", "train.py", "rank"])


@pytest.mark.timeout(180)
def test_under_watch_a_killed_rank_is_reported_and_nothing_is_left(tmp_path):
    """Two ranks under `hangkit rank` on this machine: rank 1 is killed by SIGKILL; its shim
    reports it the moment it happens, hydra ends the job, and the relay leaves nothing in
    /tmp."""
    program = tmp_path / "killed.py"
    program.write_text(
        "import os, signal\nimport hangkit\nfrom mpi4py import MPI\n"
        "comm = MPI.COMM_WORLD\n"
        "for step in range(3):\n"
        "    hangkit.progress(step=step)\n"
        "    comm.Barrier()\n"
        "hangkit.agent.current_agent().reported.wait(30)\n"
        "comm.Barrier()\n"
        "if comm.rank == 1:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "comm.Barrier()\n")
    before = set(Path("/tmp").glob("hk-*"))
    done = subprocess.run([*HANGKIT, "watch", "--timeout", "60", "--", mpiexec(), "-n", "2",
                           *HANGKIT, "rank", "--", sys.executable, str(program)],
                          capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "[dead] rank 1 is dead: its process" in done.stderr, done.stderr[-3000:]
    assert "was killed by signal 9 (SIGKILL)" in done.stderr, done.stderr[-3000:]
    left = [p for p in set(Path("/tmp").glob("hk-*")) - before if p.suffix in (".relay",
                                                                               ".lock")]
    assert not left, left  # conftest's check covers the processes, the relay's among them


@pytest.mark.timeout(180)
def test_a_killed_relays_socket_and_lock_are_removed_by_its_shim(tmp_path):
    """SIGKILL leaves the relay no chance to remove its files; the shim that started it sees it
    die and removes them, so a node's /tmp does not fill with them job after job."""
    program = tmp_path / "kill_relay.py"
    program.write_text(
        "import psutil\n"
        "shim = psutil.Process().parent()\n"
        "relays = [p for p in shim.children() if 'hangkit.shim.relay' in ' '.join(p.cmdline())]\n"
        "assert len(relays) == 1, relays\n"
        "relays[0].kill()\n"
        "relays[0].wait(30)\n"
        "print('killed', flush=True)\n")
    before = set(Path("/tmp").glob("hk-*"))
    done = subprocess.run([*HANGKIT, "watch", "--timeout", "60", "--", *HANGKIT, "rank", "--",
                           sys.executable, str(program)],
                          capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert done.returncode == 0 and "killed" in done.stdout, done.stderr[-3000:]
    left = [p for p in set(Path("/tmp").glob("hk-*")) - before if p.suffix in (".relay",
                                                                               ".lock")]
    assert not left, left


def test_a_relay_path_is_short_and_per_job_and_node():
    endpoint, lock = relay_paths("key-a", "x3004c0s7b0n0")
    assert endpoint.startswith("ipc:///tmp/hk-") and len(endpoint) < 60
    assert relay_paths("key-a", "x3004c0s13b0n0")[0] != endpoint
    assert relay_paths("key-b", "x3004c0s7b0n0")[0] != endpoint
    assert lock.startswith("/tmp/hk-") and lock.endswith(".lock")
