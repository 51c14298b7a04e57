"""stack_capture: py-spy can read a blocked Python process's stacks here, as `hangkit watch`
needs on a hang.

Guards against the hang that cannot be explained: when a job hangs, py-spy is the stack source
for every process without a hangkit agent (DataLoader workers, launchers, ranks that never call
progress()) and for ranks whose agent is stuck. It needs the py-spy executable and ptrace
rights over the job's processes; both are found missing only at the worst moment unless
checked before. So a real dump is taken: a child blocks in a known function, py-spy dumps it
with a deadline, and the function must be in the stack it returns.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time

from hangkit import pyspy
from hangkit.probes.api import Outcome, ProbeContext, fail, kill_session, ok, timed_out, warn

KNOWN_FUNCTION = "hangkit_probe_blocked_here"
DUMP_SECONDS = 10.0  # py-spy dumps a small process in well under a second
YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
CAP_SYS_PTRACE = 19  # the capability's bit in CapEff
_READY = "ready"

# Blocks in KNOWN_FUNCTION, in a read of stdin, until the probe closes stdin.
_TARGET = f"""
import sys
def {KNOWN_FUNCTION}():
    sys.stdout.write({_READY!r} + "\\n")
    sys.stdout.flush()
    sys.stdin.read()
{KNOWN_FUNCTION}()
"""

INSTALL_ADVICE = (
    "Install py-spy into the environment that runs the job (pip install py-spy; it is a "
    "dependency of hangkit) or put it on PATH, or point HANGKIT_PY_SPY at a py-spy executable "
    "(unset HANGKIT_PY_SPY if it names one that is gone). Without it, a hang in a process that "
    "runs no hangkit agent is reported without stacks.")
SCOPE_MEANING = {
    0: "0 (any process of the same user may be traced)",
    1: "1 (only a process's ancestors may trace it: py-spy started by `hangkit watch` is the "
       "job's sibling, not its ancestor, and is refused)",
    2: "2 (only processes with CAP_SYS_PTRACE may trace)",
    3: "3 (no process may trace; only a reboot lowers it)",
}


def ptrace_advice(scope: int | None) -> str:
    here = (f" Here kernel.yama.ptrace_scope is {SCOPE_MEANING.get(scope, scope)}." if scope
            else "")
    return ("py-spy needs ptrace rights over the job's processes: run hangkit watch as the "
            "job's user, with kernel.yama.ptrace_scope 0 or CAP_SYS_PTRACE." + here +
            " Ask the system's administrators for kernel.yama.ptrace_scope=0 (sysctl), or "
            "give hangkit watch CAP_SYS_PTRACE (containers: --cap-add SYS_PTRACE); a watch "
            "that is the job's parent still needs one of these at scope 1 or more, as its "
            "py-spy is the job's sibling. Meanwhile ranks that run hangkit's agent (progress() "
            "under hangkit watch, or hangkit.start_agent()) report their own stacks without "
            "ptrace.")


def run(ctx: ProbeContext) -> Outcome:
    scope = ptrace_scope()
    cap = has_cap_sys_ptrace()
    command = pyspy.py_spy_command()
    data = {"ptrace_scope": scope, "cap_sys_ptrace": cap}
    if command is None:
        return fail("py-spy not found (not beside this Python, not on PATH, HANGKIT_PY_SPY "
                    "unset)", INSTALL_ADVICE, **data)
    source = _source(command)
    exe = shutil.which(command[0])
    if exe is None:
        return fail(f"py-spy from {source} is not an executable file: {command[0]}",
                    INSTALL_ADVICE, py_spy=command[0], **data)
    data.update(py_spy=exe, py_spy_from=source)
    version = _version([exe, *command[1:]], timeout=min(5.0, ctx.remaining(1.0)))
    data["py_spy_version"] = version
    scope_text = ("no Yama (ptrace limited by user and capabilities only)" if scope is None
                  else f"ptrace_scope {scope}")
    where = f"{version or 'py-spy'} at {exe} ({source}); {scope_text}"
    if scope == 3:
        return fail(f"ptrace is disabled on this system; {where}", ptrace_advice(scope), **data)

    target = subprocess.Popen([sys.executable, "-c", _TARGET], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        if not _wait_ready(target, deadline=time.monotonic() + max(ctx.remaining(1.0) / 2, 0.1)):
            if target.poll() is not None:
                return fail(f"the test process exited at once (exit code {target.returncode})",
                            "Run `python -c pass` here: Python itself does not start.", **data)
            return timed_out("the test process did not start in time", "The machine is "
                             "overloaded or Python starts slowly here (a slow filesystem?); "
                             "run the doctor again with a longer --timeout.", **data)
        native = _dump(target.pid, native=True, ctx=ctx)
        if native.threads and _has_known(native):
            data["native"] = True
            seconds = native.seconds
            if scope in (1, 2):
                how = "through CAP_SYS_PTRACE" if cap else "with this process's privileges"
                return warn(f"py-spy dump works here only {how}; {where}",
                            ptrace_advice(scope) + " Run hangkit watch with the same "
                            "privileges as this doctor.", dump_seconds=seconds, **data)
            return ok(f"native dump found {KNOWN_FUNCTION} in {seconds:.2f} s; {where}",
                      dump_seconds=seconds, **data)
        plain = _dump(target.pid, native=False, ctx=ctx)
    finally:
        _end(target)
    data["native"] = False
    data["native_error"] = native.error
    if plain.threads and _has_known(plain):
        return warn(f"only the dump without native frames works "
                    f"({native.error or 'native frames missing'}); {where}",
                    "py-spy cannot unwind native frames here, so stacks of "
                    "processes stuck in C (MPI, NCCL, gloo, locks) end at the last Python "
                    "call. Upgrade py-spy (pip install -U py-spy); the Python stacks still "
                    "work.", dump_seconds=plain.seconds, **data)
    error = plain.error or native.error or "the stack did not show the function it was in"
    data["error"] = error
    if "ptrace denied" in error:
        why = error.split("ptrace denied: ", 1)[-1].split(":")[0].split(")")[0]
        return fail(f"py-spy was refused ptrace on a test process ({why}); {where}",
                    ptrace_advice(scope), **data)
    if "did not answer" in error:
        return timed_out(f"py-spy dump: {error}; {where}",
                         "py-spy hung while reading a small process: try another py-spy "
                         "version (pip install -U py-spy).", **data)
    return fail(f"py-spy dump failed: {error}; {where}",
                f"{version or 'This py-spy'} cannot read this Python "
                f"({sys.version.split()[0]}): upgrade it (pip install -U py-spy).", **data)


class _Dump:
    def __init__(self, result: pyspy.DumpResult, seconds: float):
        self.threads, self.error, self.seconds = result.threads, result.error, round(seconds, 3)


def _dump(pid: int, *, native: bool, ctx: ProbeContext) -> _Dump:
    started = time.monotonic()
    timeout = max(min(DUMP_SECONDS, ctx.remaining(1.0) / 2), 0.1)
    result = pyspy.finish_dump(pyspy.start_dump(pid, native=native), pid, timeout=timeout)
    return _Dump(result, time.monotonic() - started)


def _has_known(dump: _Dump) -> bool:
    return any(f.function == KNOWN_FUNCTION for t in dump.threads for f in t.frames)


def _wait_ready(proc: subprocess.Popen, *, deadline: float) -> bool:
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        readable, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not readable:
            return False
        chunk = os.read(proc.stdout.fileno(), 64)
        if not chunk:
            return False
        line += chunk
    return line.strip() == _READY.encode()


def _end(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()  # its read returns and it exits
        proc.wait(timeout=2)
    except (OSError, subprocess.TimeoutExpired):
        kill_session(proc)
        proc.wait()
    finally:
        proc.stdout.close()


def _source(command: list[str]) -> str:
    if os.environ.get(pyspy.PY_SPY_ENV):
        return pyspy.PY_SPY_ENV
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return "beside this Python" if command[0] == beside else "PATH"


def _version(command: list[str], *, timeout: float) -> str | None:
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True,
                              timeout=max(timeout, 0.1), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def ptrace_scope() -> int | None:
    """Yama's ptrace_scope, None where Yama is not there (ptrace then needs only the same user
    or CAP_SYS_PTRACE)."""
    try:
        with open(YAMA_SCOPE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def has_cap_sys_ptrace() -> bool | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None
