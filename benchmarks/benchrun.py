"""What the benchmarks share: the marker every process they start inherits (so none can be
left behind unseen), finding those processes, and the closing summary of figures."""

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


def print_summary(results: list[tuple[str, bool]], started: float) -> None:
    left = marked_processes()
    print(f"\nsummary ({time.monotonic() - started:.0f} s):")
    for line, met in results:
        print(f"  [{'ok' if met else 'MISSED'}] {line}")
    print(f"  processes left behind: {', '.join(str(p.pid) for p in left) or 'none'}")
