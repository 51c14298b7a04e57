"""What a probe module gets and returns. A probe is `run(ctx: ProbeContext) -> Outcome`.

A probe runs in a child process of its own (on each rank with --ranks), which the doctor kills
at the deadline; so a probe may block, but it should finish its own sub-steps before
ctx.deadline with ctx.remaining() to say what it found so far rather than time out silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hangkit.files import write_atomic
from hangkit.text import last_line


@dataclass
class Outcome:
    status: str  # ok, warn, fail, timeout (a sub-step's deadline passed), skipped
    detail: str
    advice: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def ok(detail: str, **data) -> Outcome:
    return Outcome("ok", detail, None, data)


def warn(detail: str, advice: str, **data) -> Outcome:
    return Outcome("warn", detail, advice, data)


def fail(detail: str, advice: str, **data) -> Outcome:
    return Outcome("fail", detail, advice, data)


def timed_out(detail: str, advice: str, **data) -> Outcome:
    return Outcome("timeout", detail, advice, data)


def skipped(detail: str, **data) -> Outcome:
    return Outcome("skipped", detail, None, data)


def worst(outcomes: list[Outcome]) -> str:
    order = ("timeout", "fail", "warn", "ok", "skipped")
    return min((o.status for o in outcomes), key=order.index, default="ok")


@dataclass
class ProbeContext:
    timeout: float  # the probe's whole deadline, in seconds
    path: str  # the directory the filesystem probe tests
    rank: int | None  # None: not under --ranks
    world_size: int | None
    started: float = field(default_factory=time.monotonic)
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    name: str = "probe"
    out: str | None = None  # under --ranks, where this rank's result (and last words) go

    def say(self, step: str) -> None:
        """What the probe is about to wait for. If the doctor has to kill the probe, the last
        of these is reported as its last words (per rank under --ranks)."""
        who = "no launcher" if self.rank is None else f"rank {self.rank}/{self.world_size}"
        line = f"{self.name}: {who}: {step}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if self.out is not None and self.rank is not None:
            with contextlib.suppress(OSError):
                write_atomic(os.path.join(self.out, f"rank-{self.rank}.last"), line)

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def remaining(self, margin: float = 0.5) -> float:
        """Seconds left before the doctor kills this probe, less a margin to report in."""
        return max(self.deadline - time.monotonic() - margin, 0.0)


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception)|Bus error)\b.*")


@dataclass
class ChildResult:
    returncode: int | None  # None: killed at the deadline
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def last_line(self, stream: str = "stderr") -> str:
        return last_line(getattr(self, stream))

    def report(self, marker: str) -> dict | None:
        """The JSON the child printed after `marker` (its last such line), even if the child
        was killed after printing it."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(marker):
                try:
                    return json.loads(line[len(marker):])
                except ValueError:
                    return None
        return None

    def error_lines(self) -> list[str]:
        """Lines of stderr that name an error ("OSError: AF_UNIX path too long", "Bus error")."""
        return [x.strip()[:200] for x in self.stderr.splitlines() if _ERROR_LINE.match(x)]

    def ended_how(self) -> str:
        if self.returncode is None:
            return "killed at its deadline"
        if self.returncode < 0:
            return f"killed by signal {-self.returncode}"
        return f"exit code {self.returncode}"

    def tried(self, marker: str, budget: float) -> dict:
        """One try of something that may hang, as a dict: the child's own report (with "ok"),
        or why there is none; "cause" is the first error line of its stderr, if it says more."""
        errors = self.error_lines()
        cause = errors[0] if errors else None
        found = self.report(marker)
        if found is not None:
            found["cause"] = None if found.get("ok") or cause == found.get("error") else cause
            return found
        if self.timed_out:
            return {"ok": False, "hung": True, "seconds": round(self.seconds, 3),
                    "cause": cause, "error": f"did not finish within {budget:.1f} s"}
        return {"ok": False, "seconds": round(self.seconds, 3), "cause": cause,
                "error": f"ended without a result ({self.ended_how()})"
                + ("" if cause else f": {self.last_line() or 'no output'}")}


def run_python(code: str, *, timeout: float, env: dict[str, str] | None = None,
               args: Sequence[str] = ()) -> ChildResult:
    """Runs `python -c code` in a session of its own and waits at most `timeout`. Then the
    whole session is killed, whether the child hung or exited: a hanging import, its threads,
    and anything it left behind (DataLoader workers, torch_shm_manager) go with it. Output goes
    through files, so a leftover holding a pipe cannot delay the result."""
    started = time.monotonic()
    env, marker = marked_environment(env)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            code_ = proc.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            code_ = None
        seconds = time.monotonic() - started
        kill_session(proc, marker=marker)
        out.seek(0)
        err.seek(0)
        return ChildResult(code_, out.read().decode(errors="replace"),
                           err.read().decode(errors="replace"), seconds)


MARKER_VARIABLE = "HANGKIT_PROBE_ID"


def marked_environment(env: dict[str, str] | None) -> tuple[dict[str, str], str]:
    """env plus a marker every process started from it inherits, even one that daemonizes
    (torch_shm_manager does): kill_session finds them all by it."""
    marker = uuid.uuid4().hex
    return {**(os.environ if env is None else env), MARKER_VARIABLE: marker}, marker


def kill_session(proc: subprocess.Popen, *, marker: str | None = None,
                 reap: float = 5.0) -> None:
    """SIGKILL to proc, its session, its descendants and every process carrying `marker`,
    then waits up to `reap` seconds for them to be gone. Killing the session alone would miss
    descendants in sessions of their own (run_python's children, wandb's service, hydra's
    proxy and the MPI ranks under it) and daemons (torch_shm_manager)."""
    import psutil  # here: probe modules import api, and the doctor's children should start fast

    from hangkit.procfs import read_environ, remove_unheld_shared_memory, shared_memory_files

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    known = {p.pid for p in descendants} | {proc.pid, os.getpid()}
    for p in psutil.process_iter():
        if p.pid in known:
            continue
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(p.pid) == proc.pid or (
                    marker and (read_environ(p.pid) or {}).get(MARKER_VARIABLE) == marker):
                descendants.append(p)
    # A SIGKILLed MPI rank leaves its MPICH segment in /dev/shm: removed once nobody holds it.
    held = shared_memory_files([proc.pid, *(p.pid for p in descendants)])
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()
    deadline = time.monotonic() + reap
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=reap)  # unkillable (D state) is left to the kernel
    # Not our children: they are gone once they are zombies, whoever reaps them.
    while descendants and time.monotonic() < deadline:
        descendants = [p for p in descendants if not _gone(p)]
        if descendants:
            time.sleep(0.01)
    remove_unheld_shared_memory(held)


def _gone(process) -> bool:
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
