"""Finding every process of a watched job, including ones that try to slip away.

Three nets, because each alone misses something:
- the descendants of the job's first process;
- the watcher is a child subreaper, so a process whose parent dies (a double-forked daemon, a
  rank whose mpiexec was killed) is re-parented to the watcher instead of to init;
- every job process inherits a marker variable, found by scanning /proc/*/environ, which also
  catches processes that moved to their own session and whose parent is still alive elsewhere.
"""

from __future__ import annotations

import ctypes
import logging
import os

import psutil

from hangkit.procfs import read_environ

log = logging.getLogger(__name__)

MARKER_VARIABLE = "HANGKIT_WATCH_ID"
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Makes orphaned descendants re-parent to this process (Linux 3.4+). False if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class JobTree:
    """The processes of one job: the first process, what it started, and what carries the marker.

    `root_pid` None: the first process is gone (watch's guardian, after watch died). `helpers`:
    children of the watcher that are not the job's (its guardian)."""

    def __init__(self, root_pid: int | None, marker: str, *, helpers: frozenset[int] = frozenset()):
        self.root_pid = root_pid
        self.marker = marker
        self.helpers = helpers

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for proc in self._roots():
            found.setdefault(proc.pid, proc)
            try:
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                continue
        for pid in (os.getpid(), *self.helpers):
            found.pop(pid, None)
        return sorted(found.values(), key=lambda p: p.pid)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes()]

    def _roots(self) -> list[psutil.Process]:
        roots = []
        first = [self.root_pid] if self.root_pid is not None else []
        for pid in [*first, *self._orphans(), *self._marked()]:
            try:
                roots.append(psutil.Process(pid))
            except psutil.Error:
                continue
        return roots

    def _orphans(self) -> list[int]:
        # As a subreaper, every child of ours that is not the root is an orphan of the job.
        try:
            return [c.pid for c in psutil.Process().children()
                    if c.pid != self.root_pid and c.pid not in self.helpers]
        except psutil.Error:
            return []

    def _marked(self) -> list[int]:
        marked = []
        for pid in psutil.pids():
            if pid == os.getpid():
                continue
            env = read_environ(pid)
            if env and env.get(MARKER_VARIABLE) == self.marker:
                marked.append(pid)
        return marked
