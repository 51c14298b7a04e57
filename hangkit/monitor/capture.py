"""Capturing a job's processes at one moment: stacks, blocked or busy, syscall, role and rank.

capture_job() is the one way in, for `hangkit watch` and the notebook alike: the ranks' agents
first, then py-spy for what they could not give. The agents that answered are asked for their
Flight Recorder dumps meanwhile.

All py-spy dumps run concurrently and overlap the CPU sampling interval, so capturing many ranks
costs about as long as the slowest dump, not their sum.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

from hangkit import deadline, pyspy
from hangkit.agent.sidecar import RECORDING_SECONDS
from hangkit.monitor.agentstacks import gather
from hangkit.monitor.roles import FETCH_FILE, assign_roles
from hangkit.procfs import blocked_syscall, kernel_state, read_environ, runs_python
from hangkit.rankenv import rank_from_environ
from hangkit.records import (
    ProcessSnapshot,
    ProcessState,
    RankStatus,
    Recording,
    Role,
    ThreadStack,
)

# A process using more than this share of one core between two samples is busy, not blocked.
BUSY_CPU_PERCENT = 25.0
STACK_SOURCES = {"agent": "its agent", "faulthandler": "a faulthandler dump"}
# How long the ranks' agents have for their Flight Recorder dumps, asked while py-spy runs.
RECORDING_TIMEOUT = RECORDING_SECONDS + 0.5  # the agents' own deadline, and their answer


def capture_job(monitor, ranks: list[RankStatus], pids: list[int]
                ) -> list[ProcessSnapshot]:
    """Every process of the job: ranks' stacks from their agents where they answer (and from
    faulthandler where the GIL is held), everything else from py-spy. Ranks on other nodes
    come only from their agents."""
    live = [r.key for r in ranks if not r.status.ended]
    found = gather(monitor, live)
    # Only agents that answered are asked: one whose main thread holds the GIL never will.
    answering = [k for k, a in found.items() if a.source == "agent"]
    asked = deadline.start(
        lambda: monitor.request_recordings(answering, timeout=RECORDING_TIMEOUT),
        timeout=RECORDING_TIMEOUT + 1.0, name="flight recorder dumps") if answering else None
    local = {a.pid: (a.threads, a.source) for a in found.values() if a.host == monitor.host}
    snapshots = capture(pids, known=local)
    ranks_by_pid = {r.pid: r.rank for r in ranks if r.host == monitor.host}
    for s in snapshots:
        if s.rank is None:  # e.g. a rank already gone: its environment is unreadable
            s.rank = ranks_by_pid.get(s.pid)
    for a in found.values():
        if a.host != monitor.host:
            snapshots.append(ProcessSnapshot(
                pid=a.pid, ppid=None, rank=a.rank, role=Role.RANK, cmdline=[],
                state=ProcessState.REMOTE,
                threads=a.threads, stacks_from=a.source,
                note=f"on {a.host}: stacks from {STACK_SOURCES[a.source]}"))
    try:
        recordings = asked.result() if asked is not None else {}
    except deadline.DeadlineExceeded:  # cannot happen but for a monitor that has stopped
        recordings = {}
    for s in snapshots:
        key = f"rank {s.rank}"
        if s.role != Role.RANK or s.rank is None or key not in answering:
            continue
        dump, error = recordings.get(key, (None, "its agent did not send its dump within "
                                                 f"{RECORDING_TIMEOUT:g} s"))
        s.recording = Recording(rank=s.rank, dump=dump or {}, error=None if dump else error)
    return snapshots


@dataclass
class _Pending:
    snapshot: ProcessSnapshot
    proc: psutil.Process | None
    cpu_before: float | None
    wants_stacks: bool = False
    dump: object = None  # the py-spy run, None also when py-spy could not be started


def capture(pids: list[int], *, known: dict[int, tuple[list[ThreadStack], str]] | None = None,
            sample_interval: float = 0.5, timeout: float = 10.0,
            clock=time.monotonic) -> list[ProcessSnapshot]:
    """Snapshots of pids. Never raises for a process that vanishes or cannot be read.

    `known` holds stacks already had from a rank's agent, {pid: (threads, "agent" or
    "faulthandler")}: those processes are not dumped with py-spy again, but still sampled for
    CPU and syscall.
    """
    known = known or {}
    deadline = clock() + timeout
    pending = [_start(pid) for pid in pids]
    started = clock()
    for p in pending:
        if p.snapshot.pid in known:
            p.snapshot.threads, p.snapshot.stacks_from = known[p.snapshot.pid]
            p.snapshot.note = f"stacks from {STACK_SOURCES[p.snapshot.stacks_from]}"
            continue
        p.wants_stacks = p.proc is not None and _wants_stacks(p.snapshot, p.proc)
        if p.wants_stacks:
            p.dump = pyspy.start_dump(p.snapshot.pid)
    remaining = sample_interval - (clock() - started)
    if remaining > 0:
        time.sleep(remaining)  # the sampling interval itself: CPU time is measured across it
    wall = max(clock() - started, 1e-3)
    for p in pending:
        _finish_cpu(p, wall)
    for p in pending:
        if p.wants_stacks:
            result = pyspy.dump(p.snapshot.pid, started=p.dump,
                                timeout=max(deadline - clock(), 0.1))
            p.snapshot.threads = result.threads
            p.snapshot.stacks_from = "py-spy" if result.threads else None
            p.snapshot.stack_error = result.error
            if result.gone:
                p.snapshot.state = ProcessState.EXITED
    snapshots = [p.snapshot for p in pending]
    ranks = {p.snapshot.pid: p.snapshot.rank for p in pending}
    assign_roles(snapshots, ranks)
    _read_worker_indices(snapshots, timeout=max(deadline - clock(), 0.1))
    return snapshots


def _read_worker_indices(snapshots: list[ProcessSnapshot], *, timeout: float) -> None:
    """Which dataset indices each fetching DataLoader worker holds: a second dump, with locals.

    Only workers inside the fetcher are dumped again, so an idle job pays nothing for it.
    """
    fetching = [s for s in snapshots if s.role == Role.DATALOADER_WORKER and any(
        f.file.endswith(FETCH_FILE) for t in s.threads for f in t.frames)]
    dumps = [(s, pyspy.start_dump(s.pid, native=False, with_locals=True)) for s in fetching]
    deadline = time.monotonic() + timeout
    for s, proc in dumps:
        result = pyspy.finish_dump(proc, s.pid, timeout=max(deadline - time.monotonic(), 0.1))
        if result.raw is not None:
            s.fetching = pyspy.local_value(result.raw, "_MapDatasetFetcher.fetch",
                                           "possibly_batched_index")


def _start(pid: int) -> _Pending:
    snap = ProcessSnapshot(pid=pid, ppid=None, rank=None, role=Role.OTHER, cmdline=[],
                           state=ProcessState.UNREADABLE)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            snap.ppid = proc.ppid()
            snap.cmdline = proc.cmdline()
            times = proc.cpu_times()
        snap.rank = rank_from_environ(read_environ(pid))
        snap.session_id = _session(pid)
        return _Pending(snap, proc, times.user + times.system)
    except psutil.NoSuchProcess:
        snap.state, snap.note = ProcessState.EXITED, "exited before capture"
    except psutil.AccessDenied as e:
        snap.note = f"not readable: {e}"
    return _Pending(snap, None, None)


def _finish_cpu(p: _Pending, wall: float) -> None:
    if p.proc is None:
        return
    s = p.snapshot
    try:
        times = p.proc.cpu_times()
        if p.proc.status() == psutil.STATUS_ZOMBIE:
            s.state, s.note = ProcessState.EXITED, "exited during capture (zombie)"
            return
    except psutil.NoSuchProcess:
        s.state, s.note = ProcessState.EXITED, "exited during capture"
        return
    except psutil.AccessDenied as e:
        s.note = f"not readable: {e}"
        return
    s.cpu_percent = round(100.0 * (times.user + times.system - p.cpu_before) / wall, 1)
    s.state = (ProcessState.BUSY if s.cpu_percent >= BUSY_CPU_PERCENT
               else ProcessState.BLOCKED)
    s.kernel_state = kernel_state(s.pid)
    s.syscall = blocked_syscall(s.pid)


def _wants_stacks(snapshot: ProcessSnapshot, proc: psutil.Process) -> bool:
    """py-spy only on processes that run Python: mpiexec or a shell has no Python stack."""
    if runs_python(snapshot.pid, snapshot.cmdline):
        return True
    snapshot.stack_error = "not a Python process"
    return False


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
