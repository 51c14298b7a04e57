"""Fixtures shared by the tests: running `hangkit watch`, and making sure nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from hangkit.procfs import read_environ

PROGRAMS = Path(__file__).parent / "programs"
TAG_VARIABLE = "HANGKIT_TEST_TAG"


def tagged_processes(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        env = read_environ(proc.pid)
        if env and env.get(TAG_VARIABLE) == tag and proc.pid != os.getpid():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                continue
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind(monkeypatch):
    """Every process a test starts carries a tag; any still alive afterwards fails the test."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG_VARIABLE, tag)
    yield
    left = tagged_processes(tag)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=5)
    assert not left, "processes left behind: " + "; ".join(
        f"{p.pid} {' '.join(p.cmdline()) if p.is_running() else ''}" for p in left)


def kill_tree(proc: subprocess.Popen, *, timeout: float = 60) -> list[psutil.Process]:
    """A test's own cleanup of a job it started: SIGKILL to proc and all its descendants,
    reaped; returns those still alive after `timeout` (killed is not yet gone)."""
    procs = []
    with contextlib.suppress(psutil.Error):
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait(timeout=timeout)
    return psutil.wait_procs(procs, timeout=timeout)[1]


@contextlib.contextmanager
def removing_left_shared_memory():
    """Around a job whose MPI ranks are killed or abort, outside watch: MPICH removes its
    /dev/shm segment only in MPI_Finalize, so the segments made meanwhile that nobody holds
    at the end are removed (the tests run one at a time: what is new is this test's)."""
    from hangkit.procfs import new_shared_memory, remove_unheld_shared_memory, shared_memory_names

    before = shared_memory_names()
    try:
        yield
    finally:
        remove_unheld_shared_memory(new_shared_memory(before))


@dataclass
class WatchRun:
    returncode: int
    stdout: bytes
    stderr: bytes
    report_dir: Path
    ready_dir: Path

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")

    @property
    def report(self) -> dict:
        return json.loads((self.report_dir / "hang-report.json").read_text())

    def ready_records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.ready_dir.glob("pid-*.json"))]

    def process(self, pid: int) -> dict:
        return next(p for p in self.report["processes"] if p["pid"] == pid)


@pytest.fixture
def run_watch(tmp_path):
    """Runs `hangkit watch` on a command; programs find $HANGKIT_READY_DIR for their records."""

    def run(command: list[str], *, options: list[str] = (), timeout: float = 60,
            env: dict | None = None, cwd: Path | None = None) -> WatchRun:
        ready_dir = tmp_path / "ready"
        ready_dir.mkdir(exist_ok=True)
        report_dir = tmp_path / "report"
        full_env = {**os.environ, "HANGKIT_READY_DIR": str(ready_dir), **(env or {})}
        argv = [sys.executable, "-m", "hangkit", "watch", "--report-dir", str(report_dir),
                *options, "--", *command]
        done = subprocess.run(argv, capture_output=True, env=full_env, timeout=timeout,
                              cwd=cwd or tmp_path)
        return WatchRun(done.returncode, done.stdout, done.stderr, report_dir, ready_dir)

    return run


def program(name: str) -> list[str]:
    return [sys.executable, str(PROGRAMS / name)]


def mpiexec() -> str:
    path = Path(sys.executable).with_name("mpiexec")
    if not path.exists():
        pytest.skip("mpiexec not installed (the local-mpi extra)")
    return str(path)


def limited_doctor(only: str, timeout: float, *options: str) -> list:
    """The doctor under resource limits (ulimit -n, -v), the way a job script would set them:
    tests/programs/probes/limited_doctor.py sets them, runs the doctor and prints JSON."""
    from hangkit.records import ProbeResult

    argv = [sys.executable, str(PROGRAMS / "probes" / "limited_doctor.py"), "--only", only,
            "--timeout", str(timeout), *options]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    assert done.returncode == 0, done.stderr[-2000:]
    return [ProbeResult.from_json(d) for d in json.loads(done.stdout)]


def doctor_where_missing(probe: str, package: str, tmp_path: Path) -> dict:
    """Runs one probe under an interpreter where `package` is really not installed: the one
    this virtualenv was made from, given hangkit (the source tree) and its dependency psutil,
    and none of the venv's other packages. Returns the probe's result as JSON."""
    base = getattr(sys, "_base_executable", None)
    if sys.prefix == sys.base_prefix or not base:
        pytest.skip(f"not in a virtualenv: no interpreter without {package} at hand")
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "psutil").symlink_to(Path(psutil.__file__).parent)
    root = Path(__file__).parent.parent
    done = subprocess.run(
        [base, str(PROGRAMS / "probes_misc" / "doctor_json.py"), probe, package],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{deps}"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    if out["found"][package]:
        pytest.skip(f"{base} has {package} too")
    (result,) = out["results"]
    return result
