"""What a shim does to its rank's tree when its relay asks: capture it, sample it, signal it,
end it. The shim is the ancestor of every process in the tree (and their subreaper), which is
what ptrace_scope=1 asks of a tracer, so py-spy and /proc reach them all from here.

The capture is the monitor's own (monitor/capture.py's capture()), run here, on the node.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil

from hangkit import pyspy
from hangkit.procfs import runs_python
from hangkit.records import ThreadStack

FAULTHANDLER_SECONDS = 1.0  # for a GIL-holding rank's faulthandler file to be written


def tree_pids(rank_pid: int, *, exclude: set[int] = frozenset()) -> list[int]:
    """The rank and every process below this shim (orphans of the rank's tree re-parent here:
    the shim is their subreaper), but not the shim's own helpers (the relay, py-spy)."""
    pids = [rank_pid]
    try:
        for p in psutil.Process().children(recursive=True):
            if p.pid not in exclude and p.pid != rank_pid:
                pids.append(p.pid)
    except psutil.Error:
        pass
    return pids


def capture(rank_pid: int, request: dict, *, exclude: set[int] = frozenset()) -> list[dict]:
    """Snapshots (as JSON) of the rank's tree: the agent's stacks for the rank when the relay
    has them, else a faulthandler dump when the agent's main thread holds the GIL, else
    py-spy's; py-spy for every other process."""
    from hangkit.monitor.agentstacks import faulthandler_dump
    from hangkit.monitor.capture import capture as capture_pids

    known: dict[int, tuple[list[ThreadStack], str]] = {}
    for pid, threads in (request.get("known") or {}).items():
        known[int(pid)] = ([ThreadStack.from_json(t) for t in threads], "agent")
    fault = request.get("faulthandler")
    if fault and isinstance(fault.get("pid"), int) and fault["pid"] not in known:
        threads = faulthandler_dump(fault["pid"], fault["file"], int(fault["signal"]),
                                    fault.get("main_ident"), timeout=FAULTHANDLER_SECONDS)
        if threads:
            known[fault["pid"]] = (threads, "faulthandler")
    host = socket.gethostname()
    snapshots = capture_pids(tree_pids(rank_pid, exclude=exclude), known=known)
    for s in snapshots:
        s.host = host
    return [s.to_json() for s in snapshots]


def sample(rank_pid: int, request: dict, *, exclude: set[int] = frozenset(),
           timeout: float = 2.0) -> list[dict]:
    """One main-thread stack of each Python process of the tree that the relay's agents did
    not give (`skip`): py-spy without native frames, all at once."""
    skip = set(request.get("skip") or ())
    pids = [p for p in tree_pids(rank_pid, exclude=exclude) if p not in skip and runs_python(p)]
    started = [(pid, pyspy.start_dump(pid, native=False)) for pid in pids]
    ends_at = time.monotonic() + timeout
    out = []
    for pid, proc in started:
        result = pyspy.finish_dump(proc, pid, timeout=max(ends_at - time.monotonic(), 0.1))
        main = next((t for t in result.threads if t.is_main), None)
        if main is not None:
            out.append({"pid": pid, "rank": None, "thread": main.to_json()})
    return out


def send_signal(rank_pid: int, signum: int, *, tree: bool,
                exclude: set[int] = frozenset()) -> str:
    """The signal to the rank (and with `tree`, to every process below it); what was done."""
    targets = tree_pids(rank_pid, exclude=exclude) if tree else [rank_pid]
    sent = []
    for pid in targets:
        try:
            os.kill(pid, signum)
            sent.append(pid)
        except OSError:
            continue
    name = signal.Signals(signum).name
    return f"{name} to pid {', '.join(map(str, sent))}" if sent else f"no process took {name}"
