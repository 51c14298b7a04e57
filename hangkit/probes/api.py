"""What a probe module gets and returns. A probe is `run(ctx: ProbeContext) -> Outcome`.

A probe runs in a child process of its own (on each rank with --ranks), which the doctor kills
at the deadline; so a probe may block, but it should finish its own sub-steps before
ctx.deadline with ctx.remaining() to say what it found so far rather than time out silently.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any


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

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def remaining(self, margin: float = 0.5) -> float:
        """Seconds left before the doctor kills this probe, less a margin to report in."""
        return max(self.deadline - time.monotonic() - margin, 0.0)


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
        lines = [x for x in getattr(self, stream).splitlines() if x.strip()]
        return lines[-1].strip() if lines else ""


def run_python(code: str, *, timeout: float, env: dict[str, str] | None = None,
               args: list[str] = ()) -> ChildResult:
    """Runs `python -c code` in a session of its own; at the deadline the whole session is
    killed (a hanging import, its threads and any processes it started), never waited on."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 0.01))
        return ChildResult(proc.returncode, out, err, time.monotonic() - started)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a grandchild that left the session holds the pipes
            out, err = "", ""
        return ChildResult(None, out, err, time.monotonic() - started)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL to proc's session and to all its descendants: sub-children that started
    sessions of their own (run_python's, wandb's service) are not in proc's process group."""
    import psutil  # here: probe modules import api, and the doctor's children should start fast

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()
