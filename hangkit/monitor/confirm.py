"""Looking again before anything is called a hang.

A detector fires on silence, or on a stall of the ranks' progress beats; neither proves the job
is hung. Four ranks importing torch on a loaded machine are silent too, their stacks moving
from module to module. So before a verdict, hangkit samples every Python process of the job
SAMPLES times over about a second (the ranks' agents where they answer, py-spy without native
frames for the rest: cheap), then captures them once as the report would, and classes each
(records.Activity):

- waiting: its stack never changed, and it is blocked (a syscall, a lock, a queue), or inside a
  collective even at full CPU (MPI busy-polls while it waits: that is waiting, not work);
- spinning: its stack never changed and it is on a CPU (a GIL-held C call, a livelock);
- progressing: new stacks keep appearing (imports, compilation, a long forward pass);
- looping: it keeps coming back to stacks it showed before (a retry loop, a training loop that
  neither prints nor beats): not progress, whatever the CPU says.

A job with a progressing rank or DataLoader worker is not hung: the caller keeps watching and
looks again a period later, remembering the stacks seen so far, so that a loop slow enough to
look like progress in one look is a loop in the next. The last look's capture, taken when no
rank is progressing, is the picture the report, the tree and the diagnosis come from.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field

import psutil

from hangkit import deadline, pyspy
from hangkit.monitor.capture import capture_job, heard_nodes, under_shims
from hangkit.monitor.collectives import collective_of
from hangkit.monitor.stacks import (
    bare_name,
    frame_text,
    innermost_python_frame,
    is_instrumentation,
    main_location,
    short_path,
)
from hangkit.procfs import runs_python
from hangkit.records import (
    Activity,
    Look,
    NodeReport,
    ProcessLook,
    ProcessSnapshot,
    ProcessState,
    RankStatus,
    Role,
    ThreadStack,
)
from hangkit.text import who as ranks_and_pids

SAMPLES = 5  # stack samples per process in one look, before its capture
GAP = 0.25  # seconds between samples: with the capture, a look takes about 2 s
SAMPLE_TIMEOUT = 2.0  # seconds one round of samples may take (py-spy on a loaded machine)
AGENT_TIMEOUT = 0.5  # seconds the ranks' agents have to answer one sample

Signature = tuple[tuple[str, str, int | None], ...]
Who = tuple[str, int]  # (host, pid): pids are per node


def signature(thread: ThreadStack | None) -> Signature | None:
    """A thread's Python frames, as comparable as the agent's and py-spy's stacks allow (py-spy
    qualifies method names, the agent does too from 3.11, so only the bare name counts)."""
    if thread is None:
        return None
    return tuple((bare_name(f), f.file, f.line) for f in thread.frames
                 if not f.native and not is_instrumentation(f)) or None


def classify(history: list[Signature], look: list[Signature], *, busy: bool,
             in_collective: bool) -> Activity:
    """The activity of one process from its stacks: those of earlier looks at this silence
    (`history`, oldest first) and this look's samples, in order. Pure."""
    if not look:
        return Activity.GONE
    if len(set(look)) == 1:  # it stood still for the whole look
        if look[0] in history and len(set(history)) > 1:
            return Activity.LOOPING  # but it has been elsewhere since, and came back
        return Activity.SPINNING if busy and not in_collective else Activity.WAITING
    earlier = list(history)
    new = returns = 0
    for sig in look:
        if sig not in earlier:
            new += 1
        elif sig != earlier[-1]:
            returns += 1  # back at a stack it showed before, with others in between
        earlier.append(sig)
    return Activity.LOOPING if returns and new <= returns else Activity.PROGRESSING


@dataclass
class Confirmation:
    """The looks at one silence (or stall), and the stacks they have seen, per process."""

    looks: list[Look] = field(default_factory=list)
    seen: dict[Who, list[Signature]] = field(default_factory=lambda: defaultdict(list))
    snapshots: list[ProcessSnapshot] = field(default_factory=list)  # the latest capture
    nodes: list[NodeReport] = field(default_factory=list)  # how its nodes answered it
    progressing: list[ProcessLook] = field(default_factory=list)  # the latest look's

    @property
    def all_gone(self) -> bool:
        """Whether the latest look found every rank and worker gone (exited, or unreadable)."""
        deciding = [p for p in self.looks[-1].processes if p.deciding] if self.looks else []
        return bool(deciding) and all(p.activity == Activity.GONE for p in deciding)

    def look(self, monitor, ranks: list[RankStatus], pids: list[int], *, at: float,
             samples: int = SAMPLES, gap: float = GAP) -> Look:
        """Samples every Python process, captures them, classes each; returns the look (also
        kept in .looks, its capture in .snapshots)."""
        started, cpu_before = time.monotonic(), _cpu_seconds()
        work_before = _tree_cpu(pids)
        sampled: dict[Who, list[Signature]] = defaultdict(list)
        latest: dict[Who, ThreadStack] = {}
        heard = heard_nodes(monitor)
        nodes, covered = [n.host for n in heard], under_shims(monitor, heard)
        python = [pid for pid in pids if pid not in covered and runs_python(pid)]
        agents = {r.key: r for r in ranks if not r.status.ended and r.host not in nodes}
        quiet: dict[str, set[str]] = {}  # per node, its agents that did not answer
        for i in range(samples):
            if i:
                time.sleep(gap)  # the samples must be spread to see a stack change
            for who, thread in _sample(monitor, agents, python, nodes, quiet).items():
                sig = signature(thread)
                if sig is not None:
                    sampled[who].append(sig)
                    # Importing in any sample says what it does (start-up: NH-01) better
                    # than wherever the last sample caught it between two imports.
                    if who not in latest or not _importing(latest[who]):
                        latest[who] = thread
        captured = time.monotonic()
        job = capture_job(monitor, ranks, pids)
        self.snapshots, self.nodes = job.snapshots, job.nodes
        capture_seconds = time.monotonic() - captured
        processes, looked = [], {}
        for s in self.snapshots:
            if s.role == Role.LAUNCHER or (not s.threads and s.state != ProcessState.EXITED):
                continue  # no Python to judge (a shell, mpiexec), or nothing read
            who = (s.host or monitor.host, s.pid)
            final = signature(s.main_thread)
            mine = sampled.get(who, []) + ([final] if final is not None else [])
            activity = classify(self.seen[who], mine, busy=s.state == ProcessState.BUSY,
                                in_collective=collective_of(s.main_thread) is not None)
            if s.state == ProcessState.EXITED:
                activity = Activity.GONE
            processes.append(ProcessLook(
                pid=s.pid, rank=s.rank, role=s.role, activity=activity,
                where=_doing(latest.get(who) or s.main_thread, s), cpu_percent=s.cpu_percent,
                stacks=[_innermost(sig) for sig in mine], distinct=len(set(mine))))
            looked[who] = processes[-1]
            self.seen[who].extend(mine)
        credit_helpers(looked, self.snapshots, monitor.host, _grown(work_before),
                        time.monotonic() - started)
        look = Look(at=round(at, 1), seconds=round(time.monotonic() - started, 2),
                    samples=samples, processes=processes,
                    capture_seconds=round(capture_seconds, 2),
                    cpu_seconds=round(_cpu_seconds() - cpu_before, 3))
        self.progressing = [p for p in processes
                            if p.activity == Activity.PROGRESSING and p.deciding]
        look.verdict = "progressing" if self.progressing else "hung"
        self.looks.append(look)
        return look


def progressing_phrase(looks: list[ProcessLook]) -> str:
    """'ranks 0-3 are progressing: rank 0 importing (torch/distributed/...); ...'"""
    ranks = sorted({p.rank for p in looks if p.rank is not None})
    shown = "; ".join(f"{p.label} {p.where}" for p in looks[:3]) + (
        "; ..." if len(looks) > 3 else "")
    one = len(ranks) == 1 if ranks else len(looks) == 1
    named = ranks_and_pids(ranks, [p.pid for p in looks])
    return f"{named} {'is' if one else 'are'} progressing: {shown}"


def _sample(monitor, agents: dict[str, RankStatus], pids: list[int], nodes: list[str],
            quiet: dict[str, set[str]]) -> dict[Who, ThreadStack]:
    """One stack sample of each process: main threads, keyed by (host, pid). Nodes with a
    relay sample themselves (their agents, and py-spy by the shims for the rest); ranks that
    report straight here answer through their agents; py-spy, all at once and without native
    frames (cheaper, and enough to see a stack move), samples the rest of this host's. An
    agent that does not answer (its main thread holds the GIL) is not asked again in this
    look (`agents`, and `quiet` for each node, are updated)."""
    asked = deadline.start(lambda: monitor.ask_nodes(
        "sample", nodes, timeout=SAMPLE_TIMEOUT,
        per_host={n: {"quiet": sorted(quiet.get(n, ()))} for n in nodes}),
        timeout=SAMPLE_TIMEOUT + 1.0, name="node samples") if nodes else None
    answered = monitor.request_stacks(list(agents), timeout=AGENT_TIMEOUT) if agents else {}
    out: dict[Who, ThreadStack] = {}
    for key in [k for k in agents if k not in answered]:
        del agents[key]
    for key, threads in answered.items():
        r = agents.get(key)  # an agent numbered by its process group meanwhile answers
        main = next((t for t in threads if t.is_main), threads[0] if threads else None)
        if r is not None and main is not None:  # under its new key: its next sample counts
            out[(r.host, r.pid)] = main
    dumps = [(pid, pyspy.start_dump(pid, native=False)) for pid in pids
             if (monitor.host, pid) not in out]
    ends_at = time.monotonic() + SAMPLE_TIMEOUT
    for pid, proc in dumps:
        result = pyspy.finish_dump(proc, pid, timeout=max(ends_at - time.monotonic(), 0.1))
        main = next((t for t in result.threads if t.is_main), None)
        if main is not None:
            out[(monitor.host, pid)] = main
    try:
        replies = asked.result() if asked is not None else {}
    except deadline.DeadlineExceeded:
        replies = {}
    for host, reply in replies.items():
        quiet.setdefault(host, set()).update(reply.get("quiet") or ())
        for sample in reply.get("samples") or ():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out[(host, int(sample["pid"]))] = ThreadStack.from_json(sample["thread"])
    return out


# A rank's helpers that used this share of a core over a look are at work for it: a cold
# torch.compile's workers and their g++, a subprocess that preprocesses (NH-04).
HELPER_WORK_SHARE = 0.25


def credit_helpers(looked: dict[Who, ProcessLook], snapshots: list[ProcessSnapshot],
                    host: str, grown: dict[int, float], seconds: float) -> None:
    """A rank (or DataLoader worker) that waits while processes it started work is
    progressing: its helpers (not ranks or workers themselves, whose own activity counts) are
    progressing Python (Lightning's ranks importing before they have their numbers), busy
    programs (g++), or used CPU during the look, reaped children included (what churns faster
    than a capture sees; this host's only). Changed in place, saying which helper worked."""
    children: dict[Who, list[ProcessSnapshot]] = defaultdict(list)
    for s in snapshots:
        children[(s.host or host, s.ppid)].append(s)
    for (node, pid), p in looked.items():
        if not p.deciding or p.activity in (Activity.PROGRESSING, Activity.GONE):
            continue
        here = grown if node == host else {}
        why = _helper_work(node, children[(node, pid)], children, looked, here, seconds,
                           reaped=here.get(pid, (0.0, 0.0))[1])
        if why:
            p.activity, p.where = Activity.PROGRESSING, f"{p.where}, while {why}"


def _helper_work(node: str, below: list[ProcessSnapshot], children, looked,
                 grown: dict[int, tuple[float, float]], seconds: float, *,
                 reaped: float) -> str | None:
    """Why the processes below a rank are at work, or None. `reaped`: the CPU the rank's own
    children that ended during the look used (g++ runs for a second or two)."""
    stack, used, names = list(below), reaped, {"exited children"} if reaped else set()
    while stack:
        s = stack.pop()
        if s.role in (Role.RANK, Role.DATALOADER_WORKER):
            continue  # judged by its own activity
        stack.extend(children[(node, s.pid)])
        seen = looked.get((node, s.pid))
        if seen is not None and seen.activity == Activity.PROGRESSING:
            return f"its subprocess {s.pid} is progressing: {seen.where}"
        if not s.threads and s.state == ProcessState.BUSY:
            return f"its subprocess {s.pid} ({_program(s)}) is busy ({s.cpu_percent or 0:.0f}% CPU)"
        if s.pid in grown:
            used += sum(grown[s.pid])
            names.add(_program(s))
    if used >= HELPER_WORK_SHARE * seconds:
        return (f"its subprocesses ({', '.join(sorted(names)[:3])}) used {used:.1f} s of CPU "
                f"in {seconds:.1f} s")
    return None


def _program(s: ProcessSnapshot) -> str:
    return os.path.basename(s.cmdline[0]) if s.cmdline else str(s.pid)


def _tree_cpu(pids: list[int]) -> dict[int, tuple[float, float]]:
    """Each process's CPU seconds: (its own, its children's that ended and were reaped)."""
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = (t.user + t.system, t.children_user + t.children_system)
    return out


def _grown(before: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]]:
    after = _tree_cpu(list(before))
    return {pid: (after[pid][0] - was[0], after[pid][1] - was[1])
            for pid, was in before.items() if pid in after}


def _cpu_seconds() -> float:
    """CPU time of this process and of its children waited for (the py-spy runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _innermost(sig: Signature) -> str:
    function, file, line = sig[-1]
    return f"{function} ({short_path(file)}:{line})" if line else f"{function} ({file})"


def _doing(thread: ThreadStack | None, snapshot: ProcessSnapshot) -> str:
    """What a process is doing, in a few words: 'importing (torch/distributed/c10d.py)', or
    where its main thread stands."""
    if thread is None:
        return main_location(snapshot)
    if _importing(thread):
        inner = innermost_python_frame(ThreadStack(0, None, [
            f for f in thread.frames if "importlib" not in f.file]))
        return f"importing ({short_path(inner.file)})" if inner else "importing"
    inner = innermost_python_frame(thread)
    return frame_text(inner) if inner else main_location(snapshot)


def _importing(thread: ThreadStack) -> bool:
    return any("importlib._bootstrap" in f.file or bare_name(f) == "_find_and_load"
               for f in thread.frames)
