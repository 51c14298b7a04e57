"""What the benchmarks share: the marker every process they start inherits (so none can be
left behind unseen), finding those processes, running the figures, and the closing summary."""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
import uuid

import psutil

MARKER, MARKER_VALUE = "HANGKIT_BENCH_ID", uuid.uuid4().hex


def marked_processes() -> list[psutil.Process]:
    """Live (not zombie) processes carrying this run's marker, wherever they were re-parented."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE
                    and proc.environ().get(MARKER) == MARKER_VALUE):
                found.append(proc)
    return found


def job_env(**extra: str) -> dict[str, str]:
    """Our environment without any monitor's address, plus extra and the marker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANGKIT_MONITOR")}
    return {**env, **extra, MARKER: MARKER_VALUE}


def end_all(*roots: subprocess.Popen | None) -> None:
    """SIGTERM, 3 s of grace, SIGKILL: the roots and every marked process; then reaps the roots."""
    victims = {p.pid: p for p in marked_processes()}
    for root in filter(None, roots):
        with contextlib.suppress(psutil.Error):
            victims[root.pid] = psutil.Process(root.pid)
    for action in ("terminate", "kill"):
        for proc in victims.values():
            with contextlib.suppress(psutil.Error):
                getattr(proc, action)()
        victims = {p.pid: p for p in psutil.wait_procs(list(victims.values()), timeout=3)[1]}
    for root in filter(None, roots):
        with contextlib.suppress(subprocess.TimeoutExpired):
            root.wait(timeout=3)


def read_line(proc: subprocess.Popen, deadline: float) -> str:
    """The child's next stdout line. Its lines come seconds apart, so bytes read past one newline
    would be a protocol error; raises TimeoutError past the deadline."""
    data, fd = b"", proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                raise TimeoutError(f"no line from pid {proc.pid} before the deadline")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"pid {proc.pid} ended its output (exit code {proc.poll()})")
            data += chunk
    return data.decode()


def load_line(extra: str = "") -> str:
    """The machine's load when the figures were taken: wall-clock figures suffer when other
    processes want this small machine's cores."""
    return (f"load average over the last minute: {os.getloadavg()[0]:.2f} on "
            f"{os.cpu_count()} cores{extra}")


def kill_marked() -> None:
    """SIGKILL to every process this run started that is still there (its marker)."""
    left = marked_processes()
    for p in left:
        with contextlib.suppress(Exception):
            p.kill()
    psutil.wait_procs(left, timeout=10)


def judged(what: str, shown: str, goal: str, ratio: float, met: bool) -> tuple[bool, str]:
    """A figure's line: its value, its goal, the ratio of the two, and the verdict."""
    return met, f"{what}: {shown} (goal {goal}; ratio to goal {ratio:.2f}, " \
                f"{'met' if met else 'MISSED'})"


def measure_all(figures, workdir, *, end) -> list[tuple[str, bool]]:
    """Runs each (title, measure) figure: measure(workdir) gives (met, line) or a list of them.
    A figure that fails is reported and the next one runs; end() runs whatever happens.
    Returns (line, met) for the summary."""
    results = []
    try:
        for title, measure in figures:
            print(f"\n{title}")
            try:
                found = measure(workdir)
                lines = found if isinstance(found, list) else [found]
            except Exception as e:  # report and go on to the next figure
                lines = [(False, f"{title}: FAILED to measure: {e!r}")]
            for met, line in lines:
                print(line)
                results.append((line, met))
    finally:
        end()
    return results


def print_summary(results: list[tuple[str, bool]], started: float) -> None:
    left = marked_processes()
    print(f"\nsummary ({time.monotonic() - started:.0f} s):")
    for line, met in results:  # met None: a figure with no goal of its own
        print(f"  [{'info' if met is None else 'ok' if met else 'MISSED'}] {line}")
    print(f"  processes left behind: {', '.join(str(p.pid) for p in left) or 'none'}")


def start_relay(address: str, key: str, workdir, env: dict) -> tuple:
    """A real node relay (hangkit.shim.relay), as the first `hangkit rank` of a node starts
    it, reporting to the monitor at `address`: (its Popen, the endpoint agents send to). It
    ends with this process (its parent) or on SIGTERM."""
    import fcntl
    import sys

    from hangkit.shim import relay_paths

    endpoint, _ = relay_paths(key)
    lock = os.path.join(workdir, "relay.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hangkit.shim.relay", endpoint, str(fd), lock,
             str(os.getpid())], pass_fds=(fd,), env={**env, "HANGKIT_MONITOR": address,
                                                     "HANGKIT_MONITOR_KEY": key})
    finally:
        os.close(fd)
    return proc, endpoint
