"""Running probes: each in a child process (an mpiexec job of N ranks with --ranks), all at
once up to a limit, each killed at its own deadline. The doctor's wall time is bounded by its
slowest probe, not by the sum, and a hanging probe costs no more than its own timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hangkit.errors import UsageError, check_at_least, check_positive_seconds
from hangkit.launcher import job_nodes
from hangkit.probes import TIMEOUT_ADVICE, select
from hangkit.probes.api import kill_session, marked_environment
from hangkit.probes.child import RESULT_MARKER
from hangkit.records import ProbeResult
from hangkit.text import last_line

DEFAULT_TIMEOUT = 30.0
# Probe processes the doctor runs at once (a probe on N ranks counts N). Each may import
# torch (~300 MB) and start children of its own; more than a few per core and the probes
# measure the doctor's own load (slow imports, workers missing their deadlines) instead of
# the machine. A probe waiting for a slot has not started its deadline yet.
MAX_PROCESSES = max(4, 4 * (os.cpu_count() or 1))
POLL_SECONDS = 0.05  # how often running probes are checked; their deadlines bound the wait
# After the deadline's SIGKILL, how long the doctor waits for a probe's processes to be gone.
REAP_SECONDS = 5.0


@dataclass
class _Run:
    name: str
    proc: subprocess.Popen | None = None
    out_dir: Path | None = None
    stdout: Path | None = None
    stderr: Path | None = None
    started: float = 0.0
    killed: bool = False
    marker: str | None = None  # inherited by every process of the probe


def run_doctor(only: str | list[str] | None = None, *, ranks: int | None = None,
               timeout: float = DEFAULT_TIMEOUT, path: str | os.PathLike = ".",
               launcher: list[str] | None = None) -> list[ProbeResult]:
    """Runs the probes and returns one result per probe (per rank with `ranks`)."""
    names = select(only)
    check_positive_seconds("timeout", timeout)
    if ranks is not None:
        check_at_least("ranks", ranks, 1)
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"path is not a directory: {path}")
    if ranks is not None and launcher is None:
        from hangkit.launcher import mpiexec_command

        launcher = mpiexec_command(ranks)
    workdir = _workdir(ranks, path)
    try:
        runs = [_Run(n) for n in names]
        _run_all(runs, ranks=ranks, timeout=timeout, path=str(path.resolve()),
                 launcher=launcher, workdir=workdir)
        results = []
        for run in runs:
            results += _results(run, ranks, timeout)
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _workdir(ranks: int | None, path: Path) -> Path:
    """Where the probes' ranks write their results. Across several nodes of a PBS job, in
    `path` (the current directory by default), which every node sees: each node's /tmp is its
    own, and results written there by ranks on other nodes would never be read."""
    if ranks is not None and len(job_nodes()) > 1:
        try:
            return Path(tempfile.mkdtemp(prefix=".hangkit-doctor-", dir=path))
        except OSError as e:
            raise UsageError(f"path {path}: cannot write the probes' results there "
                             f"({e.strerror}): ranks on the job's other nodes need a "
                             "directory every node sees") from None
    return Path(tempfile.mkdtemp(prefix="hangkit-doctor-"))


def _run_all(runs: list[_Run], *, ranks, timeout, path, launcher, workdir) -> None:
    per_run = ranks or 1
    slots = max(1, MAX_PROCESSES // per_run)
    waiting, running = list(runs), []
    try:
        while waiting or running:
            while waiting and len(running) < slots:
                run = waiting.pop(0)
                _start(run, ranks=ranks, timeout=timeout, path=path, launcher=launcher,
                       workdir=workdir)
                running.append(run)
            now = time.monotonic()
            for run in list(running):
                if run.proc.poll() is not None:
                    kill_session(run.proc, marker=run.marker, reap=REAP_SECONDS)  # leftovers
                    running.remove(run)
                elif now - run.started >= timeout:
                    run.killed = True
                    kill_session(run.proc, marker=run.marker, reap=REAP_SECONDS)
                    running.remove(run)
            if running:
                time.sleep(POLL_SECONDS)
    finally:
        for run in running:  # interrupted: leave nothing behind
            kill_session(run.proc, marker=run.marker, reap=REAP_SECONDS)


def _start(run: _Run, *, ranks, timeout, path, launcher, workdir) -> None:
    run.stdout, run.stderr = workdir / f"{run.name}.out", workdir / f"{run.name}.err"
    config = {"timeout": timeout, "path": path, "started_at": time.time(), "out": None}
    if ranks is not None:
        run.out_dir = workdir / run.name
        run.out_dir.mkdir()
        config["out"] = str(run.out_dir)
    argv = [sys.executable, "-m", "hangkit.probes.child", run.name, json.dumps(config)]
    if ranks is not None:
        argv = [*launcher, *argv]
    env, run.marker = marked_environment(None)
    with open(run.stdout, "wb") as out, open(run.stderr, "wb") as err:
        run.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
    run.started = time.monotonic()


def _results(run: _Run, ranks: int | None, timeout: float) -> list[ProbeResult]:
    err_tail = last_line(_read(run.stderr))[:300]
    if ranks is None:
        for line in _read(run.stdout).splitlines():
            if line.startswith(RESULT_MARKER):
                return [ProbeResult.from_json(json.loads(line[len(RESULT_MARKER):]))]
        return [_missing(run, None, timeout, err_tail)]
    found = {}
    for file in run.out_dir.glob("rank-*.json"):
        result = ProbeResult.from_json(json.loads(file.read_text()))
        found[result.rank] = result
    return [found.get(r) or _missing(run, r, timeout, _read(run.out_dir / f"rank-{r}.last")
                                     or err_tail) for r in range(ranks)]


def _missing(run: _Run, rank: int | None, timeout: float, err_tail: str) -> ProbeResult:
    seconds = round(time.monotonic() - run.started, 3) if run.killed else 0.0
    if run.killed:
        return ProbeResult(run.name, rank, "timeout", round(min(seconds, timeout), 3),
                           f"did not finish within {timeout:g} s"
                           + (f"; last words: {err_tail}" if err_tail else ""),
                           TIMEOUT_ADVICE.get(run.name, _TIMEOUT_ADVICE))
    code = run.proc.returncode
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return ProbeResult(run.name, rank, "fail", 0.0,
                       f"the probe's process ended without a result ({how})"
                       + (f": {err_tail}" if err_tail else ""), _CRASH_ADVICE)


_TIMEOUT_ADVICE = ("Something this probe does never returned. Run it alone with a longer "
                   "--timeout (hangkit doctor --only NAME --timeout 120) and, if it still "
                   "hangs, under `hangkit watch` to see where.")
_CRASH_ADVICE = ("The probe's process crashed or was killed (out of memory?). Its last "
                 "words are above; run it alone to see all of its output.")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
