"""watch's death ends what it watched: SIGKILL (the OOM killer) and SIGHUP (a dropped ssh
session) to `hangkit watch` while its job hangs or runs, on real mpiexec ranks.

Before: the ranks went to PID 1 and kept spinning, and watch's TMPDIR, its hook directory and
MPICH's /dev/shm segment stayed. Now the job's first process has a parent-death signal and
watch's guardian (hangkit/monitor/guardian.py) ends the rest and removes the files; SIGHUP ends
the job as SIGTERM does, whatever became of watch's terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TAG_VARIABLE, mpiexec, program, tagged_processes

from hangkit.procfs import shared_memory_files

HANGUP = 128 + signal.SIGHUP


def left_by_mpi() -> set[Path]:
    """MPICH's shared memory and hydra's topology files: a killed rank or proxy leaves them."""
    return set(Path("/dev/shm").glob("mpich_shm_*")) | set(Path("/tmp").glob("hydra_hwloc_*"))


class Watched:
    """`hangkit watch` started by hand, so that a test can signal it: its output in files (a
    pipe not read would block it), or its stderr on a terminal the test can hang up."""

    def __init__(self, tmp_path: Path, command: list[str], options: list[str], *,
                 terminal: bool = False, nohup: bool = False):
        self.ready_dir = tmp_path / "ready"
        self.ready_dir.mkdir()
        self.report_dir = tmp_path / "report"
        # A TMPDIR too long for AF_UNIX sockets: watch makes the job a short one of its own,
        # and its hook directory lands here.
        self.long_tmp = tmp_path / ("t" * 60) / ("u" * 60)
        self.long_tmp.mkdir(parents=True)
        self.out_path, self.err_path = tmp_path / "watch.out", tmp_path / "watch.err"
        env = {**os.environ, "HANGKIT_READY_DIR": str(self.ready_dir), "TMPDIR": str(self.long_tmp)}
        argv = [sys.executable, "-m", "hangkit", "watch", "--report-dir", str(self.report_dir),
                *options, "--", *command]
        if nohup:
            argv = ["nohup", *argv]
        self.master = None
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            if terminal:
                self.master, slave = pty.openpty()
                err = slave
            try:
                # A session of its own: the pty is its stderr, never its controlling terminal.
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=err, env=env, cwd=tmp_path,
                                             start_new_session=True)
            finally:
                if terminal:
                    os.close(slave)
        self.terminal_text = b""

    @property
    def err(self) -> str:
        return (self.terminal_text + self.err_path.read_bytes()).decode(errors="replace")

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.ready_dir.glob("pid-*.json"))]

    def wait_for(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc.poll() is not None:
                pytest.fail(f"watch exited ({self.proc.returncode}) before {what}: {self.err}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s: {self.err}")
            if self.master is not None:
                self.read_terminal(0.05)
            else:
                time.sleep(0.05)  # ok-sleep: polling a readiness file against a deadline

    def read_terminal(self, timeout: float) -> None:
        import select

        if select.select([self.master], [], [], timeout)[0]:
            with contextlib.suppress(OSError):
                self.terminal_text += os.read(self.master, 65536)

    def hang_up(self) -> None:
        """The terminal goes (an ssh session dropped): watch's stderr now fails with EIO."""
        os.close(self.master)
        self.master = None

    def stop(self) -> None:
        if self.master is not None:
            os.close(self.master)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_until_gone(tag: str, paths: list[str], timeout: float) -> None:
    """No process of the test left (watch's guardian included) and none of these paths."""
    deadline = time.monotonic() + timeout
    while True:
        left = tagged_processes(tag)
        there = [p for p in paths if os.path.lexists(p)]
        if not left and not there:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout} s, still running: "
                        f"{[(p.pid, p.cmdline()[:3]) for p in left]}; still there: {there}")
        time.sleep(0.1)  # ok-sleep: polling for the guardian's work against a deadline


def job_files(records: list[dict]) -> list[str]:
    """What watch made for the job, as its ranks saw it, and the ranks' /dev/shm segments."""
    env = records[0]["env"]
    tmpdir, hook = env["TMPDIR"], env["HANGKIT_INJECT"]
    assert os.path.isdir(tmpdir) and os.path.basename(tmpdir).startswith("hk-"), env
    assert os.path.isdir(hook), env
    shm = shared_memory_files(r["pid"] for r in records)
    assert shm, "MPICH's segment is mapped by the ranks"
    return [tmpdir, hook, *sorted(shm)]


@pytest.mark.timeout(180)
def test_sigkill_to_watch_during_an_mpi_hang_ends_the_job_and_leaves_nothing(tmp_path):
    before = left_by_mpi()
    watched = Watched(tmp_path, [mpiexec(), "-n", "2", *program("mpi_barrier_plain.py")],
                      ["--timeout", "300", "--grace", "3"])
    try:
        watched.wait_for("both ranks in their hang", lambda: len(watched.records()) == 2, 120)
        paths = job_files(watched.records())
        watched.proc.kill()  # as the OOM killer does: no handler, no finally
        assert watched.proc.wait(10) == -signal.SIGKILL
        wait_until_gone(os.environ[TAG_VARIABLE], paths, timeout=60)
    finally:
        watched.stop()
    assert "is gone without ending its job: its guardian" in watched.err, watched.err
    assert not left_by_mpi() - before
    assert not watched.report_dir.exists(), "no hang was confirmed: no report"


@pytest.mark.timeout(180)
def test_sighup_to_watch_during_an_mpi_hang_ends_the_job_with_its_terminal_gone(tmp_path):
    before = left_by_mpi()
    watched = Watched(tmp_path, [mpiexec(), "-n", "2", *program("mpi_barrier_plain.py")],
                      ["--timeout", "300", "--grace", "3"], terminal=True)
    try:
        watched.wait_for("both ranks in their hang", lambda: len(watched.records()) == 2, 120)
        paths = job_files(watched.records())
        watched.hang_up()
        watched.proc.send_signal(signal.SIGHUP)
        assert watched.proc.wait(60) == HANGUP, watched.err
        wait_until_gone(os.environ[TAG_VARIABLE], paths, timeout=30)
    finally:
        watched.stop()
    assert not left_by_mpi() - before
    assert not watched.report_dir.exists(), "the hang was not confirmed yet: no report"


@pytest.mark.timeout(180)
def test_sighup_while_a_confirmed_hang_is_ended_keeps_the_report_and_kills_at_once(tmp_path):
    # The hang is confirmed and reported; the job ignores SIGTERM (a grandchild and a daemon
    # that left the session too), so watch waits out a long grace. The terminal drops then:
    # the report stays, what is left is killed now, not after the grace, and watch exits
    # 128 + SIGHUP with nothing left behind.
    watched = Watched(tmp_path, program("ignores_sigterm.py"), ["--timeout", "2", "--grace", "600"],
                      terminal=True)
    try:
        watched.wait_for("the end of the confirmed hang",
                         lambda: b"ending the job: SIGTERM" in watched.terminal_text, 150)
        report = json.loads((watched.report_dir / "hang-report.json").read_text())
        assert len(watched.records()) == 3
        watched.hang_up()
        watched.proc.send_signal(signal.SIGHUP)
        assert watched.proc.wait(60) == HANGUP, watched.err
        wait_until_gone(os.environ[TAG_VARIABLE], [], timeout=30)
    finally:
        watched.stop()
    assert report["hang"] is True
    assert json.loads((watched.report_dir / "hang-report.json").read_text()) == report


@pytest.mark.timeout(120)
def test_sigkill_to_watch_of_a_healthy_job_ends_it_and_removes_its_directories(tmp_path):
    watched = Watched(tmp_path, [*program("periodic_output.py"), "0.2", "600"],
                      ["--timeout", "60"])
    try:
        watched.wait_for("the job's output", lambda: b"tick 2" in watched.out_path.read_bytes(),
                         60)
        tmpdir = next(line.split("TMPDIR=")[1].split()[0] for line in watched.err.splitlines()
                      if "set TMPDIR=" in line)
        (hook,) = watched.long_tmp.glob("hangkit-hook-*")
        assert os.path.isdir(tmpdir)
        watched.proc.kill()
        assert watched.proc.wait(10) == -signal.SIGKILL
        wait_until_gone(os.environ[TAG_VARIABLE], [tmpdir, str(hook)], timeout=60)
    finally:
        watched.stop()


@pytest.mark.timeout(120)
def test_sighup_is_ignored_under_nohup(tmp_path):
    # nohup's promise: the job outlives the terminal. watch keeps watching; SIGTERM still ends it.
    watched = Watched(tmp_path, [*program("periodic_output.py"), "0.2", "600"],
                      ["--timeout", "60"], nohup=True)
    try:
        watched.wait_for("the job's output", lambda: b"tick 2" in watched.out_path.read_bytes(),
                         60)
        watched.proc.send_signal(signal.SIGHUP)
        seen = watched.out_path.read_bytes().count(b"tick")
        watched.wait_for("output after the hang-up",
                         lambda: watched.out_path.read_bytes().count(b"tick") > seen + 3, 60)
        watched.proc.terminate()
        assert watched.proc.wait(60) == 128 + signal.SIGTERM, watched.err
        wait_until_gone(os.environ[TAG_VARIABLE], [], timeout=30)
    finally:
        watched.stop()
    assert "received SIGTERM: ending the job" in watched.err
