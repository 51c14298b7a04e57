"""What the benchmarks share: the marker every process they start inherits (so none can be
left behind unseen), finding those processes, running the figures, and the closing summary."""

from __future__ import annotations

import contextlib
import os
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
    for line, met in results:
        print(f"  [{'ok' if met else 'MISSED'}] {line}")
    print(f"  processes left behind: {', '.join(str(p.pid) for p in left) or 'none'}")
