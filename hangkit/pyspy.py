"""Python stacks of another process through py-spy, the primary stack source.

py-spy reads the target's memory, so it works while the target's main thread holds the GIL in a
CPU-bound loop or sits in C (MPI, gloo, a lock), where in-process tools cannot run. Used by the
monitor's capture, by a rank's safe DataLoader for its own hung worker, and by the doctor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from hangkit.records import Frame, ThreadStack

PY_SPY_ENV = "HANGKIT_PY_SPY"  # a py-spy command to use instead of the installed one


@dataclass
class DumpResult:
    threads: list[ThreadStack]
    error: str | None = None  # set when there are no stacks, saying why
    gone: bool = False  # the process exited before or during the dump
    raw: list[dict] | None = None  # py-spy's own JSON, for what records do not keep (locals)
    unexplained: bool = False  # failed for no known reason: worth a try without --native


def py_spy_command(environ=os.environ) -> list[str] | None:
    override = environ.get(PY_SPY_ENV)
    if override:
        return override.split()
    beside_python = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside_python, os.X_OK):
        return [beside_python]
    found = shutil.which("py-spy")
    return [found] if found else None


def start_dump(pid: int, *, native: bool = True,
               with_locals: bool = False) -> subprocess.Popen | None:
    """Starts `py-spy dump` on pid without waiting, so many processes are dumped at once."""
    command = py_spy_command()
    if command is None:
        return None
    argv = [*command, "dump", "--pid", str(pid), "--json"]
    if native:
        argv.append("--native")
    if with_locals:
        argv.append("--locals")
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None  # reported by finish_dump as "py-spy not found"


def finish_dump(proc: subprocess.Popen | None, pid: int, *, timeout: float) -> DumpResult:
    if proc is None:
        override = os.environ.get(PY_SPY_ENV)
        if override:
            return DumpResult([], error=f"py-spy not found at {PY_SPY_ENV}={override!r}")
        return DumpResult([], error=f"py-spy not found (install it, or set {PY_SPY_ENV})")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return DumpResult([], error=f"py-spy did not answer within {timeout:g} s")
    if proc.returncode != 0:
        return _failure(err.decode(errors="replace"), pid)
    try:
        raw = json.loads(out)
        return DumpResult(parse_dump(raw, pid), raw=raw)
    except (ValueError, KeyError, TypeError) as e:
        return DumpResult([], error=f"py-spy output could not be read: {e}")


def dump(pid: int, *, timeout: float = 10.0, started: subprocess.Popen | None = None
         ) -> DumpResult:
    """Stacks of every thread of pid, native frames included when py-spy can unwind them.

    `started` is a dump already begun with start_dump(), when many run at once.
    """
    result = finish_dump(started or start_dump(pid), pid, timeout=timeout)
    if result.unexplained:
        # Native unwinding fails on some builds; the Python stacks alone are still worth having.
        result = finish_dump(start_dump(pid, native=False), pid, timeout=timeout)
    return result


def local_value(raw: list[dict], function: str, name: str) -> str | None:
    """The repr of local `name` in the innermost frame called `function`, from a --locals dump."""
    for thread in raw:
        for frame in thread.get("frames") or []:
            if frame.get("name") == function:
                for local in frame.get("locals") or []:
                    if local.get("name") == name:
                        return local.get("repr")
    return None


def _failure(stderr: str, pid: int) -> DumpResult:
    first = next((ln.strip() for ln in stderr.splitlines() if ln.strip()), "no message")
    lowered = stderr.lower()
    if not os.path.exists(f"/proc/{pid}"):
        return DumpResult([], error="process exited during capture", gone=True)
    # Without ptrace permission py-spy cannot even read the executable's name (/proc/PID/exe).
    denied = "permission denied" in lowered or "operation not permitted" in lowered or (
        "failed to get process executable" in lowered and not _exe_readable(pid))
    if not denied and ("failed to find python version" in lowered
                       or "failed to get process executable" in lowered):
        return DumpResult([], error="not a Python process")
    if denied:
        return DumpResult([], error=(
            f"py-spy could not attach (ptrace denied: {first}); allow ptrace "
            "(kernel.yama.ptrace_scope=0 or CAP_SYS_PTRACE) to get this process's stacks"))
    return DumpResult([], error=f"py-spy failed: {first}", unexplained=True)


def _exe_readable(pid: int) -> bool:
    try:
        os.readlink(f"/proc/{pid}/exe")
    except PermissionError:
        return False
    except OSError:
        pass  # gone, or a kernel thread: not a question of permission
    return True


def parse_dump(data: list[dict], pid: int) -> list[ThreadStack]:
    """py-spy lists frames innermost first; records hold them outermost first."""
    threads = []
    for t in data:
        frames = []
        for f in reversed(t.get("frames") or []):
            native = f.get("module") is not None
            if native and f["name"].startswith("0x"):
                continue  # an unsymbolised address says nothing to a reader
            frames.append(Frame(function=f["name"], file=f.get("filename") or "?",
                                line=f.get("line") or None, native=native))
        threads.append(ThreadStack(
            id=t.get("thread_id", 0),
            name=t.get("thread_name"),
            frames=frames,
            os_thread_id=t.get("os_thread_id"),
            is_main=t.get("os_thread_id") == pid,
            owns_gil=bool(t.get("owns_gil")),
            active=t.get("active"),
        ))
    threads.sort(key=lambda th: not th.is_main)
    return threads
