"""Capturing a job's processes at one moment: stacks, blocked or busy, syscall, role and rank.

capture_job() is the one way in, for `hangkit watch` and the notebook alike: the ranks' agents
first, then py-spy for what they could not give. The agents that answered are asked for their
Flight Recorder dumps meanwhile.

All py-spy dumps run concurrently and overlap the CPU sampling interval, so capturing many ranks
costs about as long as the slowest dump, not their sum.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import psutil

from hangkit import deadline, pyspy
from hangkit.agent.sidecar import RECORDING_SECONDS
from hangkit.inject import no_agent_note
from hangkit.monitor import nccl_pipe
from hangkit.monitor.agentstacks import gather
from hangkit.monitor.roles import FETCH_FILE, assign_roles
from hangkit.procfs import blocked_syscall, kernel_state, read_environ, runs_python
from hangkit.rankenv import rank_from_environ
from hangkit.records import (
    NodeReport,
    ProcessSnapshot,
    ProcessState,
    RankStatus,
    Recording,
    Role,
    ThreadStack,
)
from hangkit.shim import is_helper

# A process using more than this share of one core between two samples is busy, not blocked.
BUSY_CPU_PERCENT = 25.0
STACK_SOURCES = {"agent": "its agent", "faulthandler": "a faulthandler dump"}
# How long the ranks' agents have for their Flight Recorder dumps, asked while py-spy runs.
RECORDING_TIMEOUT = RECORDING_SECONDS + 0.5  # the agents' own deadline, and their answer
# How long a node has to capture itself: its agents' stacks, then its shims' py-spy and its
# agents' dumps at once (RECORDING_TIMEOUT), and the way back.
NODE_TIMEOUT = RECORDING_TIMEOUT + 2.5


@dataclass
class JobCapture:
    """One capture of a job: every process found, and, for ranks under `hangkit rank`, how
    each node's relay answered."""

    snapshots: list[ProcessSnapshot]
    nodes: list[NodeReport] = field(default_factory=list)


def capture_job(monitor, ranks: list[RankStatus], pids: list[int]) -> JobCapture:
    """Every process of the job. Nodes whose ranks run under `hangkit rank` capture
    themselves, each through its relay, all at once: their shims see their ranks and workers
    as ancestors do. Ranks that report straight to the monitor give their stacks through their
    agents (and faulthandler where the GIL is held); everything else local comes from py-spy.
    Ranks on other nodes without a relay come only from their agents."""
    nodes = monitor.nodes()
    now = monitor.clock()
    heard = heard_nodes(monitor, nodes)
    asked_nodes = deadline.start(
        lambda: monitor.ask_nodes("capture", [n.host for n in heard], timeout=NODE_TIMEOUT),
        timeout=NODE_TIMEOUT + 1.0, name="node captures") if heard else None
    covered = under_shims(monitor, heard)
    relayed = {n.host for n in nodes}
    live = [r.key for r in ranks if not r.status.ended and r.host not in relayed]
    found = gather(monitor, live)
    # Only agents that answered are asked: one whose main thread holds the GIL never will.
    answering = [k for k, a in found.items() if a.source == "agent"]
    asked = deadline.start(
        lambda: monitor.request_recordings(answering, timeout=RECORDING_TIMEOUT),
        timeout=RECORDING_TIMEOUT + 1.0, name="flight recorder dumps") if answering else None
    local = {a.pid: (a.threads, a.source) for a in found.values() if a.host == monitor.host}
    # A rank's agent knows its number from the process group where its launcher's variables
    # do not say it (Lightning's spawned ranks), or where the process is already gone.
    ranks_by_pid = {r.pid: r.rank for r in ranks if r.host == monitor.host}
    snapshots = capture([p for p in pids if p not in covered], known=local,
                        agent_ranks=ranks_by_pid)
    for s in snapshots:
        s.host = monitor.host
    for a in found.values():
        if a.host != monitor.host:
            snapshots.append(ProcessSnapshot(
                pid=a.pid, ppid=None, rank=a.rank, role=Role.RANK, cmdline=[],
                state=ProcessState.REMOTE, host=a.host,
                threads=a.threads, stacks_from=a.source,
                note=f"on {a.host}: stacks from {STACK_SOURCES[a.source]}"))
    try:
        recordings = asked.result() if asked is not None else {}
    except deadline.DeadlineExceeded:  # cannot happen but for a monitor that has stopped
        recordings = {}
    _attach_recordings(snapshots, recordings, answering)
    replies = _result(asked_nodes)
    reports = []
    for node in nodes:
        reply = replies.get(node.host)
        if reply is None:
            reports.append(_unanswered(node, now, snapshots))
        else:
            reports.append(_from_node(node, reply, snapshots))
    return JobCapture(snapshots, reports)


def heard_nodes(monitor, nodes=None) -> list:
    """The nodes whose relays were heard from lately: those asked to sample and capture
    themselves (a silent one is named, not waited for)."""
    now = monitor.clock()
    return [n for n in (monitor.nodes() if nodes is None else nodes)
            if now - n.last_heard < monitor.detector.config.dead_after]


def under_shims(monitor, heard: list) -> set[int]:
    """The processes of this host that its own relay samples and captures: every process
    below its shims (the shims themselves are the job's launchers, captured here)."""
    node = next((n for n in heard if n.host == monitor.host), None)
    if node is None:
        return set()
    out = set()
    for shim in node.shims.values():
        with contextlib.suppress(psutil.Error, TypeError, ValueError):
            proc = psutil.Process(int(shim.get("shim_pid")))
            out.update(c.pid for c in proc.children(recursive=True))
    return out


def _attach_recordings(snapshots: list[ProcessSnapshot], recordings: dict, asked: list[str],
                       host: str | None = None) -> None:
    """Each rank's Flight Recorder dump, or why it has none, on its snapshot."""
    for s in snapshots:
        key = f"rank {s.rank}"
        if s.role != Role.RANK or s.rank is None or key not in asked or \
                (host is not None and s.host != host):
            continue
        dump, error = recordings.get(key, (None, "its agent did not send its dump within "
                                                 f"{RECORDING_TIMEOUT:g} s"))
        s.recording = Recording(rank=s.rank, dump=dump or {}, error=None if dump else error)


def _from_node(node, reply: dict, snapshots: list[ProcessSnapshot]) -> NodeReport:
    """A node's capture, added to `snapshots`: its processes, their dumps, and a placeholder
    for each rank whose shim did not answer."""
    mine = [ProcessSnapshot.from_json(d) for d in reply.get("snapshots") or ()]
    for s in mine:
        s.host = node.host
    recordings = {k: tuple(v) for k, v in (reply.get("recordings") or {}).items()}
    _attach_recordings(mine, recordings, reply.get("asked_recordings") or [], node.host)
    missing = [k for k in reply.get("missing") or () if k in node.shims]
    for key in missing:
        mine.append(_placeholder(node, node.shims[key], "its shim did not answer in time"))
    snapshots += mine
    note = f"no answer from the shims of {', '.join(missing)}" if missing else None
    return NodeReport(node.host, node.ranks(), node.relay_pid, answered=True,
                      seconds=reply.get("seconds"), processes=len(mine), note=note)


def _unanswered(node, now: float, snapshots: list[ProcessSnapshot]) -> NodeReport:
    """A node whose relay did not answer: its ranks are named, with why, never dropped."""
    age = now - node.last_heard
    note = (f"did not answer within {NODE_TIMEOUT:g} s; its relay (pid {node.relay_pid}) was "
            f"last heard {age:.0f} s ago" + (": it is gone or its node is down"
                                             if age >= NODE_TIMEOUT else ""))
    for shim in node.shims.values():
        if shim.get("alive"):
            snapshots.append(_placeholder(node, shim, f"its node {node.host} {note}"))
    return NodeReport(node.host, node.ranks(), node.relay_pid, answered=False, note=note)


def _placeholder(node, shim: dict, why: str) -> ProcessSnapshot:
    rank = shim.get("rank")
    s = ProcessSnapshot(pid=int(shim.get("pid") or 0), ppid=shim.get("shim_pid"), rank=rank,
                        role=Role.RANK, cmdline=[], state=ProcessState.REMOTE, host=node.host,
                        note=f"not captured: {why}")
    if rank is not None:
        s.recording = Recording(rank=rank, error=f"not captured: {why}")
    return s


def _result(started) -> dict:
    if started is None:
        return {}
    try:
        return started.result()
    except deadline.DeadlineExceeded:
        return {}


@dataclass
class _Pending:
    snapshot: ProcessSnapshot
    proc: psutil.Process | None
    cpu_before: float | None
    wants_stacks: bool = False
    dump: object = None  # the py-spy run, None also when py-spy could not be started
    env: dict | None = None


def capture(pids: list[int], *, known: dict[int, tuple[list[ThreadStack], str]] | None = None,
            agent_ranks: dict[int, int | None] | None = None, sample_interval: float = 0.5,
            timeout: float = 10.0, clock=time.monotonic) -> list[ProcessSnapshot]:
    """Snapshots of pids. Never raises for a process that vanishes or cannot be read.

    `known` holds stacks already had from a rank's agent, {pid: (threads, "agent" or
    "faulthandler")}: those processes are not dumped with py-spy again, but still sampled for
    CPU and syscall. `agent_ranks` holds the ranks the agents reported, {pid: rank}: they
    stand over the launcher's variables (an agent reads its process group).
    """
    known = known or {}
    deadline = clock() + timeout
    pending = [_start(pid) for pid in pids]
    # Ranks whose agent gave no stacks: torch's NCCL watchdog is asked for their recorder
    # (nothing is asked, nor waited for, on gloo), answering while the sampling goes on.
    asked = {a.rank: a for p in pending if p.snapshot.pid not in known
             and (a := nccl_pipe.ask(p.env, p.snapshot.rank)) is not None}
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
    recorded = nccl_pipe.collect(list(asked.values()),
                                 timeout=max(min(nccl_pipe.WAIT, deadline - clock()), 0.1))
    for s in snapshots:
        reported = (agent_ranks or {}).get(s.pid)
        s.rank = reported if reported is not None else s.rank
    ranks = {s.pid: s.rank for s in snapshots}
    assign_roles(snapshots, ranks)
    for s in snapshots:
        if s.role != Role.RANK or s.stacks_from in STACK_SOURCES:
            s.no_agent = None
        if s.role == Role.RANK and s.rank in recorded:
            s.recording = recorded.pop(s.rank)
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
            snap.age = round(max(time.time() - proc.create_time(), 0.0), 1)
        env = read_environ(pid)
        snap.rank = rank_from_environ(env)
        snap.no_agent = no_agent_note(pid, env)  # kept for ranks without an agent's stacks
        snap.session_id = _session(pid)
        return _Pending(snap, proc, times.user + times.system, env=env)
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
    """py-spy only on processes that run Python: mpiexec or a shell has no Python stack; and
    not on hangkit's own shims and relays. A Python launcher is read too: torchrun's elastic
    agent waiting in rendezvous for a node that never came is where such a job stands (TD-05)."""
    if is_helper(snapshot.cmdline):
        snapshot.stack_error = "hangkit's own: its children's stacks are what matters"
        return False
    if runs_python(snapshot.pid, snapshot.cmdline):
        return True
    snapshot.stack_error = "not a Python process"
    return False


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
