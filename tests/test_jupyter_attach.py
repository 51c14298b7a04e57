"""hangkit.jupyter.attach: a running job hangkit did not start, looked at from a notebook.

The jobs are real (mpiexec ranks, a Python process at work) and started as a batch job is:
in a session of their own (`setsid -f`), not as children of the process that attaches (the
notebook's kernel does not own the batch job it attaches to). Each waits for its readiness
line in the job's log, never for a fixed time; each is ended whatever happens."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import mpiexec

import hangkit.jupyter
from hangkit import deadline
from hangkit.errors import HangkitError
from hangkit.jupyter import attach
from hangkit.jupyter.attach_view import AttachView
from hangkit.procfs import read_environ

JOB_MARKER = "HK_ATTACH_TEST_JOB"
PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())

# Rank 1 leaves at step 3 for a checkpoint that never finishes; rank 0 waits for it in the
# step's all-reduce. Plain mpi4py: nothing of hangkit's in the job.
MPI_JOB = """\
import os
import threading

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()


def save_checkpoint(step):
    threading.Event().wait()  # a write to a filesystem that never answers


for step in range(10):
    print(f"rank {rank} pid {os.getpid()} step {step}", flush=True)
    if rank == 1 and step == 3:
        save_checkpoint(step)
    comm.allreduce(1.0)
"""

# Busy and moving: each sample finds a stack it never showed before (a deeper recursion).
BUSY_JOB = """\
import os
import time


def spin():
    started = time.monotonic()
    while time.monotonic() - started < 0.03:
        pass


def deeper(n):
    if n:
        return deeper(n - 1)
    spin()


print(f"pid {os.getpid()} working", flush=True)
depth = 0
while True:
    depth += 1
    deeper(depth % 900)
"""


class Job:
    """A job started in a session of its own, its output in `log`; `end()` kills whatever
    carries its marker, and waits for it to be gone."""

    def __init__(self, tmp_path: Path, argv: list[str]):
        self.marker = uuid.uuid4().hex
        self.log = tmp_path / "job.log"
        with open(self.log, "w") as log:
            subprocess.run(["setsid", "-f", *argv], stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, JOB_MARKER: self.marker}, check=True)

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter()
                if (read_environ(p.pid) or {}).get(JOB_MARKER) == self.marker]

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 90) -> list[str]:
        """The matches of `pattern` in the job's log, once there are `count` of them."""
        ends = time.monotonic() + timeout
        while True:
            found = re.findall(pattern, self.log.read_text())
            if len(found) >= count:
                return found
            assert time.monotonic() < ends, f"no {pattern!r} x{count}: {self.log.read_text()}"
            assert self.processes(), f"the job ended: {self.log.read_text()}"
            time.sleep(0.05)  # ok-sleep: polled against the deadline above

    def end(self) -> None:
        left = self.processes()
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=10)


@pytest.fixture
def job(tmp_path):
    started: list[Job] = []

    def start(argv: list[str]) -> Job:
        started.append(Job(tmp_path, argv))
        return started[-1]

    yield start
    for j in started:
        j.end()


def shown(view: AttachView) -> tuple[str, str]:
    """(stdout, stderr) of the view displayed as a notebook shows it (text: no frontend)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        view._ipython_display_()
    return out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def text_mode(monkeypatch):
    monkeypatch.setenv("HANGKIT_NONINTERACTIVE", "1")


def test_attach_is_public():
    assert "attach" in hangkit.jupyter.__all__
    assert hangkit.jupyter.attach is attach


@pytest.mark.timeout(180)
def test_a_hung_mpi_job_shows_as_its_report_and_is_ended_when_asked(job, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(MPI_JOB)
    mpi = job([mpiexec(), "-n", "2", sys.executable, str(script)])
    mpi.wait_for(r"step 3", count=2)  # rank 0 is then in step 3's all-reduce, rank 1 not
    (pid,) = mpi.wait_for(r"rank 1 pid (\d+) step 3")
    view = attach(int(pid), report_dir=tmp_path / "report")
    assert view.error is None and view.verdict == "hung", view.text()
    report = view.report_view()
    assert report is not None and report.path == tmp_path / "report" / "hang-report.json"
    out, err = shown(view)
    assert "[MP-02]" in out and "rank 1 never reached it" in out, out
    assert "save_checkpoint" in out and not err, (out, err)
    assert mpi.processes(), "attach ended the job without being asked"

    ended = attach(int(pid), end=True, report_dir=tmp_path / "report-end")
    assert ended.verdict == "hung", ended.text()
    assert any(line.startswith("hangkit: --end: ended") for line in ended.lines()), \
        ended.lines()
    ends = time.monotonic() + 30
    while mpi.processes():
        assert time.monotonic() < ends, [p.cmdline() for p in mpi.processes()]
        time.sleep(0.05)  # ok-sleep: the ended processes are reaped by init, polled


@pytest.mark.timeout(120)
def test_a_progressing_job_shows_who_progresses_and_doing_what(job, tmp_path):
    script = tmp_path / "work.py"
    script.write_text(BUSY_JOB)
    busy = job([sys.executable, str(script)])
    (pid,) = busy.wait_for(r"pid (\d+) working")
    view = attach(int(pid), report_dir=tmp_path / "report")
    assert view.verdict == "progressing", view.text()
    assert view.report_view() is None  # a job at work: its lines, not a hang report
    out, err = shown(view)
    assert "progressing" in out and ("deeper" in out or "spin" in out), out
    assert "HANG" not in out and not err, (out, err)
    assert busy.processes(), "a progressing job is left running"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("target", "options", "says"), [
    (PID_MAX, {}, f"no process {PID_MAX}"),  # pids are below it: never a process
    (-3, {}, "a positive number"),
    ("not a job", {}, "not a PBS job id"),
    (1.5, {}, "a pid (int) or a PBS job id (str)"),
    (1, {"timeout": -1}, "timeout must be zero or more"),
])
def test_no_such_job_and_bad_input_are_one_line(target, options, says):
    view = attach(target, **options)
    assert isinstance(view.error, HangkitError) and view.result is None
    out, err = shown(view)
    assert not out and err.count("\n") == 1 and err.startswith("hangkit: error: "), err
    assert says in err and "Traceback" not in err, err


@pytest.mark.timeout(120)
def test_the_kernel_waits_no_longer_than_asked(job, tmp_path):
    """A look takes a second or two; given 0.2 s, the kernel has its line back then, and
    the look goes on in the thread left behind (waited for here, so it leaves nothing)."""
    script = tmp_path / "work.py"
    script.write_text(BUSY_JOB)
    busy = job([sys.executable, str(script)])
    (pid,) = busy.wait_for(r"pid (\d+) working")
    started = time.monotonic()
    view = attach(int(pid), wait=0.2, report_dir=tmp_path / "report")
    took = time.monotonic() - started
    assert view.error is not None and "did not finish within 0.2 s" in view.lines()[0], \
        view.lines()
    assert took < 10, took
    left = [a for a in deadline.abandoned() if a.name == f"attach to {int(pid)!r}"]
    assert left, deadline.abandoned()
    for a in left:
        a.thread.join(timeout=60)
        assert not a.thread.is_alive()
