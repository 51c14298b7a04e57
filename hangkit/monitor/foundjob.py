"""Finding the processes of a running job that hangkit did not start (`hangkit attach`).

From any one process of it (the launcher or a rank), the job is:
- its launcher's tree: the pid's ancestors, up while they are launchers proper (mpiexec,
  hydra's proxies, torchrun, srun) or Python processes of the job (a rank that starts the
  others, as Lightning's rank 0 and mp.spawn's parent do), never past a shell, a notebook
  kernel or init; then every descendant of the topmost one (ranks, their DataLoader workers);
- under PBS, every process of this user carrying the job's PBS_JOBID: on Polaris, PALS's
  daemon starts the ranks, so they are not below mpiexec.
hangkit's own processes (this one, its ancestors and children) are never part of it.

A job that runs under `hangkit watch` is watch's: `watch_of` finds the watch, which answers a
snapshot request itself (its monitor, the ranks' agents, the relays of other nodes).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import psutil

from hangkit.errors import HangkitError
from hangkit.monitor.jobtree import MARKER_VARIABLE
from hangkit.monitor.roles import SELF_ENDING_NAMES, is_launcher
from hangkit.procfs import read_environ
from hangkit.rankenv import rank_from_environ

# Launchers that start ranks, as opposed to shells and wrappers that merely run them: the
# walk up from a rank goes through these and stops at anything else.
_LAUNCHERS_PROPER = SELF_ENDING_NAMES | frozenset({
    "mpiexec.gforker", "srun", "aprun", "orted", "prted", "prterun", "torchrun", "timeout",
    "stdbuf", "numactl", "taskset", "env"})
# Where a walk up always stops: what runs the person's session, not the job.
_NOT_JOB = frozenset({"init", "systemd", "sshd", "pbs_mom", "palsd", "tmux: server", "screen",
                      "su", "sudo", "login"})
# Set by `hangkit watch` in its job's environment: where its reports and snapshots go.
REPORTS_VARIABLE = "HANGKIT_WATCH_REPORTS"
SNAPSHOT_PREFIX = "snapshot-"  # watch's snapshots: REPORTS_VARIABLE's directory/snapshot-N
PBS_JOBID = "PBS_JOBID"
SSH_VARIABLE = "HANGKIT_SSH"  # how `hangkit attach --job` reaches other nodes (default ssh)


class NoSuchJob(HangkitError):
    """The pid or job named is not running here (exit 1)."""


@dataclass
class Watched:
    """A job that runs under `hangkit watch`: watch's pid, and where its reports go."""

    pid: int
    reports: str | None


@dataclass
class FoundJob:
    """A running job: its topmost process, its PBS job id, and how to list its processes now
    (the same duck type as JobTree, so terminate.end_job ends it alike)."""

    root_pid: int
    pbs_jobid: str | None = None
    extra: list[int] = field(default_factory=list)  # found by their PBS_JOBID only

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        roots = [self.root_pid, *self.extra]
        if self.pbs_jobid:
            roots += carrying_job_id(self.pbs_jobid)
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                found.setdefault(pid, proc)
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
        for pid in _ours():
            found.pop(pid, None)
        return sorted((p for p in found.values() if not _watchers(p)), key=lambda p: p.pid)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes()]


def find_job(pid: int) -> FoundJob:
    """The job that process `pid` belongs to. NoSuchJob when there is no such process, or
    it is hangkit's own."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(pid)
    except psutil.NoSuchProcess:
        raise NoSuchJob(f"no process {pid} on this node",
                        hint="give the pid of the job's launcher or of one of its ranks, on "
                        "the node where it runs (or --job PBS_JOBID from anywhere)") from None
    if pid in _ours():
        raise NoSuchJob(f"process {pid} is this hangkit attach, its caller or its helper, "
                        "not a job")
    root = proc
    with contextlib.suppress(psutil.Error):
        for parent in proc.parents():
            if parent.pid in _ours() or not _of_the_job(parent, root):
                break
            root = parent
    env = read_environ(root.pid) or read_environ(pid) or {}
    return FoundJob(root_pid=root.pid, pbs_jobid=env.get(PBS_JOBID) or None)


def find_pbs_job(job_id: str) -> FoundJob | None:
    """The processes of this node carrying PBS_JOBID `job_id` (a PBS job's ranks and their
    launchers on this node), under the topmost of them; None when there are none."""
    carrying = carrying_job_id(job_id)
    if not carrying:
        return None
    tops = [pid for pid in carrying if _parent(pid) not in carrying]
    return FoundJob(root_pid=tops[0], pbs_jobid=job_id, extra=tops[1:])


def carrying_job_id(job_id: str) -> list[int]:
    """This user's processes on this node whose environment says PBS_JOBID=job_id (a prefix
    match on the short form: "123" finds "123.polaris-pbs-01")."""
    out = []
    uid = os.getuid()
    ours = _ours()
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.pid in ours or (uid != 0 and proc.info["uids"].real != uid):
                continue
        except (TypeError, AttributeError):
            continue
        env = read_environ(proc.pid)
        value = (env or {}).get(PBS_JOBID, "")
        if value and (value == job_id or value.split(".")[0] == job_id):
            out.append(proc.pid)
    return sorted(out)


def watch_of(pid: int) -> Watched | None:
    """The `hangkit watch` that runs the job `pid` belongs to, or None. `pid` may be watch
    itself, or any process of its job (they carry watch's marker variable)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if _is_watch(proc.cmdline()):
            for child in proc.children():
                env = read_environ(child.pid) or {}
                if MARKER_VARIABLE in env:
                    return Watched(pid, env.get(REPORTS_VARIABLE))
            return Watched(pid, None)
        env = read_environ(pid) or {}
        marker = env.get(MARKER_VARIABLE)
        if not marker:
            return None
        for parent in proc.parents():
            if (read_environ(parent.pid) or {}).get(MARKER_VARIABLE) != marker:
                return Watched(parent.pid, env.get(REPORTS_VARIABLE)) \
                    if _is_watch(parent.cmdline()) else None
    return None


def _watchers(proc: psutil.Process) -> bool:
    """`hangkit watch` and its guardian: they carry the job's PBS_JOBID, and are not the job."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return _is_watch(cmdline) or any(w.endswith("hangkit/monitor/guardian.py")
                                     for w in cmdline[:4])


def _is_watch(cmdline: list[str]) -> bool:
    """`hangkit watch ...` or `python -m hangkit watch ...`."""
    words = [os.path.basename(w) for w in cmdline[:4]]
    return "watch" in words and any(w in ("hangkit", "hangkit.cli") for w in words)


def _of_the_job(parent: psutil.Process, below: psutil.Process) -> bool:
    """Whether `parent` is part of the job of its child `below`: a launcher proper, or a
    Python process that starts ranks (a launcher module, a rank itself, the same script)."""
    try:
        cmdline = parent.cmdline()
        name = parent.name()
    except psutil.Error:
        return False
    if not cmdline or parent.pid == 1 or name in _NOT_JOB:
        return False
    base = os.path.basename(cmdline[0])
    if base in _LAUNCHERS_PROPER:
        return True
    if not base.startswith("python") or any("ipykernel" in w for w in cmdline[:4]):
        return False
    if is_launcher(cmdline):  # torchrun, accelerate launch, ... as python -m
        return True
    with contextlib.suppress(psutil.Error):
        child = below.cmdline()
        # Lightning's rank 0 starts its script again; mp.spawn's and DataLoader's children.
        if child[1:] == cmdline[1:] or "--multiprocessing-fork" in child:
            return True
    return rank_from_environ(read_environ(parent.pid)) is not None


def _parent(pid: int) -> int | None:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).ppid()
    return None


def _ours() -> set[int]:
    """This process, its ancestors, and the helpers it runs (py-spy; ssh to other nodes, which
    carries the job's PBS_JOBID when attach runs inside the job): never part of a job. Its
    other children may be one: a job a notebook kernel started."""
    me = psutil.Process()
    out = {me.pid}
    helpers = {"py-spy", os.path.basename(os.environ.get(SSH_VARIABLE) or "ssh")}
    with contextlib.suppress(psutil.Error):
        out.update(p.pid for p in me.parents())
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error, IndexError):
                if os.path.basename(child.cmdline()[0]) in helpers:
                    out.add(child.pid)
    return out
