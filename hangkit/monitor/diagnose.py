"""Diagnosis rules over captured stacks. Each rule is a pure function of the snapshots.

Summaries name ranks, pids, files and lines; advice comes from the troubleshooting table users
already know (the hang catalogue: DL-01, TD-01, ...).
"""

from __future__ import annotations

from collections.abc import Callable

from hangkit.flight_recorder.rules import from_recordings, odd_ones_out
from hangkit.monitor.advice import ADVICE
from hangkit.monitor.collectives import Collective, collective_of
from hangkit.monitor.elastic import in_rendezvous, missing_node_line, torchrun_args
from hangkit.monitor.merge import rank_processes
from hangkit.monitor.roles import FETCH_FILE
from hangkit.monitor.stacks import (
    bare_name,
    describe_state,
    innermost_python_frame,
    is_user_frame,
    main_location,
    rank_branch,
    short_path,
    source_line,
    where,
)
from hangkit.records import (
    Activity,
    Diagnosis,
    Look,
    ProcessLook,
    ProcessSnapshot,
    ProcessState,
    Role,
    StallEvent,
)
from hangkit.text import who

# The stack rules' findings about torch collectives, which the recorder's view replaces.
_RECORDER_KINDS = frozenset({"TD-01", "TD-02", "TD-06", "TD-09", "TD-10"})
_RENDEZVOUS_FUNCTIONS = frozenset({
    "init_process_group", "rendezvous", "_create_c10d_store", "_store_based_barrier",
    "_env_rendezvous_handler", "_tcp_rendezvous_handler", "TCPStore", "wait_for_workers",
    "_barrier",
})
_DATALOADER_WAIT = frozenset({"_next_data", "_get_data", "_try_get_data", "__next__"})
_NET_FILES = ("/socket.py", "/ssl.py", "/http/client.py", "/urllib3/", "/requests/", "/httpx/")
_NET_SYSCALLS = frozenset({"connect", "recvfrom", "recvmsg", "accept", "accept4"})
_FILE_SYSCALLS = frozenset({"read", "pread64", "readv", "preadv", "open", "openat", "stat",
                            "lstat", "newfstatat", "statx", "fsync", "fdatasync", "getdents64"})


def diagnose(processes: list[ProcessSnapshot], events: list[StallEvent] = (),
             looks: list[Look] = ()) -> list[Diagnosis]:
    """The diagnoses of one capture: what the ranks' Flight Recorders, the stall detector's
    events and the last look before the capture say, then the stack rules."""
    recorded = from_recordings(processes)
    # A desync the recorder saw needs no second telling from hangkit.instrument()'s counts.
    found = recorded + from_looks(looks) + [d for d in from_events(events)
                                            if not (recorded and d.kind in _RECORDER_KINDS)]
    if found:
        # The recorder's view of a collective, a dead rank or a desync read from sequence
        # numbers explains more than the same finding read from stacks, or "everyone waits in
        # the same collective".
        known = {d.kind for d in found} | {"all-in-collective"}
        if recorded:
            known |= _RECORDER_KINDS
        # A rank that raised stands in its engine's idle loop: what stacks say of it is not
        # where it stopped. And the others wait for it, whatever their CPU says (MPI
        # busy-polls): none is "running, not deadlocked".
        raised = {r for e in events if e.kind == "raised" for r in e.ranks}
        if raised:
            known.add("IP-04")
        found += [d for rule in RULES for d in rule(processes)
                  if d.kind not in known and not (raised and set(d.ranks) <= raised)]
    else:
        found = [d for rule in RULES for d in rule(processes)]
    if not found:
        ranks = rank_processes(processes)
        found.append(Diagnosis(
            kind="unknown",
            summary=(f"No known pattern: {len(ranks)} rank process(es), "
                     + "; ".join(f"{p.label} at {main_location(p)}" for p in ranks[:8])),
            advice=ADVICE["unknown"],
            ranks=sorted(p.rank for p in ranks if p.rank is not None),
            pids=[p.pid for p in ranks]))
    return found


def from_looks(looks: list[Look]) -> list[Diagnosis]:
    """Ranks and workers the last look found looping: the same few stacks, again and again."""
    if not looks:
        return []
    found = []
    for p in looks[-1].processes:
        if p.activity != Activity.LOOPING or not p.deciding:
            continue
        stacks = _places_it_returns_to(p, looks)
        who = p.label
        shown = ", ".join(stacks[:4]) + (f" and {len(stacks) - 4} more" if len(stacks) > 4 else "")
        cpu = f" at {p.cpu_percent:.0f}% CPU" if p.cpu_percent is not None else ""
        found.append(Diagnosis(
            kind="looping",
            summary=(f"{who} is looping between {shown}{cpu}: its stack keeps coming back to the "
                     f"same {len(stacks)} places, and it neither prints nor reports progress"),
            advice=ADVICE["looping"], ranks=[p.rank] if p.rank is not None else [],
            pids=[p.pid]))
    return found


def _places_it_returns_to(process: ProcessLook, looks: list[Look]) -> list[str]:
    """The places a looping process goes round, over every look at this silence: one look's
    few samples may all catch it in the same one (a retry loop that mostly backs off), and the
    places it passed through once before it started looping are left out."""
    seen = [s for look in looks for q in look.processes
            if (q.pid, q.rank, q.role) == (process.pid, process.rank, process.role)
            for s in q.stacks]
    recurring = {s for s in seen if seen.count(s) > 1}
    return list(dict.fromkeys(s for s in seen if s in recurring or s in process.stacks))


def from_events(events: list[StallEvent]) -> list[Diagnosis]:
    """The stall detector's findings that are diagnoses in their own right: a desync read from
    collective sequence numbers (TD-02, MP-02 for MPI), and a dead rank."""
    found = []
    for e in events:
        if e.kind == "desync":
            kind = e.case or "TD-02"
            found.append(Diagnosis(kind=kind,
                                   summary="Ranks are in different collectives: " + e.summary,
                                   advice=ADVICE[kind], ranks=e.ranks, pids=[]))
        elif e.kind == "dead":
            found.append(Diagnosis(kind="dead-rank", summary=e.summary,
                                   advice=ADVICE["dead-rank"], ranks=e.ranks, pids=[]))
        elif e.kind == "raised":  # a notebook engine's cell raised (jupyter/magic.py)
            found.append(Diagnosis(kind="TD-04", summary=e.summary, advice=ADVICE["TD-04"],
                                   ranks=e.ranks, pids=[]))
    return found


def _live(processes: list[ProcessSnapshot]) -> list[ProcessSnapshot]:
    return [p for p in processes
            if p.state in (ProcessState.BLOCKED, ProcessState.BUSY) and p.main_thread]


def collective_split(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """TD-01 / MP-02 (some ranks in a collective, some elsewhere), TD-02 (different collectives)."""
    ranks = [p for p in _live(rank_processes(processes)) if p.rank is not None]
    if len(ranks) < 2:
        return []
    inside = {p.rank: c for p in ranks if (c := collective_of(
        p.main_thread, blocked=p.state == ProcessState.BLOCKED))}
    if not inside:
        return []
    family = "mpi" if all(c.family == "mpi" for c in inside.values()) else "torch"
    by_op: dict[str, list[ProcessSnapshot]] = {}
    for p in ranks:
        if p.rank in inside:
            by_op.setdefault(inside[p.rank].op, []).append(p)
    outside = [p for p in ranks if p.rank not in inside]
    found = []
    if len(by_op) > 1:
        # Every rank waiting in some collective is a mismatch, never "never reached it": the
        # ranks to look at are the odd ones out, with the rank-dependent branch they took.
        odd = odd_ones_out([[q.rank for q in ps] for ps in by_op.values()])
        parts = [f"{who(sorted(q.rank for q in ps), [])} in {op}"
                 f"{_site(inside[ps[0].rank], branch=ps[0].rank in odd)}" for op, ps in
                 sorted(by_op.items(), key=lambda kv: len(kv[1]))]
        found.append(Diagnosis(
            kind="MP-02" if family == "mpi" else "TD-02",
            summary="Ranks wait in different collectives: " + "; ".join(parts),
            advice=ADVICE["MP-02" if family == "mpi" else "TD-02"],
            ranks=odd, pids=[p.pid for ps in by_op.values() for p in ps if p.rank in odd]))
    if outside:
        op, waiting = max(by_op.items(), key=lambda kv: len(kv[1]))
        spin = " (MPI busy-polls while it waits: high CPU here is waiting, not work)" if (
            family == "mpi" and any(p.state == ProcessState.BUSY for p in waiting)) else ""
        odd = "; ".join(f"{p.label} is in {main_location(p)} ({describe_state(p)})"
                        for p in outside)
        found.append(Diagnosis(
            kind="MP-02" if family == "mpi" else "TD-01",
            summary=(f"{who(sorted(p.rank for p in waiting), []).capitalize()} "
                     f"{'wait' if len(waiting) > 1 else 'waits'} in {op}"
                     f"{_site(inside[waiting[0].rank])}{spin}; "
                     f"{who(sorted(p.rank for p in outside), [])} never reached it: {odd}"),
            advice=ADVICE["MP-02" if family == "mpi" else "TD-01"],
            ranks=sorted(p.rank for p in outside), pids=[p.pid for p in outside]))
    elif len(by_op) == 1:
        (op, waiting), = by_op.items()
        found.append(Diagnosis(
            kind="all-in-collective",
            summary=(f"All {len(waiting)} ranks seen here wait in {op}"
                     f"{_site(inside[waiting[0].rank])}"),
            advice=ADVICE["all-in-collective"],
            ranks=sorted(inside), pids=[p.pid for p in waiting]))
    return found


def _site(c: Collective, *, branch: bool = False) -> str:
    """' (DDP's buffer broadcast) at train.py:40, under `if rank == 0:` at train.py:38'."""
    out = f" ({c.purpose})" if c.purpose else ""
    if c.call_site:
        out += f" at {short_path(c.call_site.file)}:{c.call_site.line}"
        taken = rank_branch(c.call_site) if branch else None
        out += f", under {taken}" if taken else ""
    return out


def rendezvous(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """TD-05: ranks waiting inside process-group initialisation."""
    stuck = [p for p in _live(processes) if p.role == Role.RANK and any(
        bare_name(f) in _RENDEZVOUS_FUNCTIONS and "torch/distributed" in f.file
        for f in p.main_thread.frames)]
    if not stuck:
        return []
    ranks = sorted(p.rank for p in stuck if p.rank is not None)
    subject = who(ranks, []) if len(ranks) == len(stuck) else ", ".join(p.label for p in stuck)
    return [Diagnosis(
        kind="TD-05",
        summary=(f"{subject[0].upper()}{subject[1:]} {'wait' if len(stuck) > 1 else 'waits'} "
                 f"in rendezvous (process-group init) in {main_location(stuck[0])}: the other "
                 "ranks never joined"),
        advice=ADVICE["TD-05"], ranks=ranks, pids=[p.pid for p in stuck])]


def elastic_rendezvous(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """TD-05 (FW-04): torchrun's elastic agents wait in rendezvous for nodes that never
    joined, so no rank has started: how many joined, of how many, where, for how long, and
    the missing nodes' launch lines."""
    agents = [(p, a) for p in processes if p.role == Role.LAUNCHER and in_rendezvous(p)
              and (a := torchrun_args(p.cmdline)) is not None]
    if not agents or any(p.role == Role.RANK for p in processes):
        return []  # with ranks started, rendezvous is over, whatever a stack caught
    args = agents[0][1]
    want = args.min_nodes
    ages = [p.age for p, _ in agents if p.age is not None]
    waited = f" for {max(ages):.0f} s" if ages else ""
    who_waits = ", ".join(f"pid {p.pid}" + (f" on {p.host}" if p.host else "") +
                          (f", node rank {a.node_rank}" if a.node_rank is not None else "")
                          for p, a in agents)
    joined = len(agents)
    count = f"{joined} of {want} nodes joined" if want and joined < want else \
        f"{joined} node(s) joined"
    summary = (f"torchrun's elastic agent ({who_waits}) waits in rendezvous at {args.endpoint} "
               f"(--nnodes {args.nnodes}){waited}: {count}, so no rank has started")
    known = {a.node_rank for _, a in agents}
    missing = [r for r in range(want or 0) if str(r) not in known] if None not in known else []
    if missing:
        summary += ("; the missing node(s) run, each on a host of the job: " + "; ".join(
            f"`{missing_node_line(args, r)}`" for r in missing))
    elif want and joined < want:
        summary += f"; {want - joined} more node(s) must run torchrun with --rdzv-endpoint " \
                   f"{args.endpoint}"
    return [Diagnosis(kind="TD-05", summary=summary, advice=ADVICE["TD-05"], ranks=[],
                      pids=[p.pid for p, _ in agents])]


def network_wait(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """WJ-01: a socket connect/recv inside an init (wandb.init and the like)."""
    found = []
    for p in _live(processes):
        frames = p.main_thread.frames
        in_net = any(any(n in f.file for n in _NET_FILES) for f in frames) or (
            p.syscall is not None and p.syscall.name in _NET_SYSCALLS
            and (p.syscall.target or "").startswith("socket:"))
        if not in_net:
            continue
        inits = [f for f in frames if not f.native and "init" in f.function.lower()
                 and not any(n in f.file for n in _NET_FILES)]
        tracker = any("wandb" in f.file for f in frames)
        kind = "WJ-01" if inits or tracker else "network-wait"
        init = inits[0] if inits else innermost_python_frame(p.main_thread)
        found.append(Diagnosis(
            kind=kind,
            summary=(f"{p.label} waits on the network"
                     + (f" ({p.syscall.describe()})" if p.syscall else "")
                     + (f" inside {where(init)}" if kind == "WJ-01" else
                        f" in {main_location(p)}")),
            advice=ADVICE[kind], ranks=[p.rank] if p.rank is not None else [], pids=[p.pid]))
    return found


def blocking_file_io(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """A blocking open/read/stat on a file: the signature of a hung or slow shared filesystem."""
    found = []
    for p in _live(processes):
        sc = p.syscall
        on_file = sc is not None and sc.name in _FILE_SYSCALLS and sc.target is not None and (
            sc.target.startswith("/"))
        if on_file and sc.target_kind in ("fifo", "pipe"):
            opening = sc.name in ("open", "openat")
            found.append(Diagnosis(
                kind="fifo-wait",
                summary=(f"{p.label} is blocked {'opening' if opening else 'reading'} the named "
                         f"pipe (FIFO) {sc.target} in {main_location(p)}: "
                         + ("no process has opened it for writing" if opening else
                            "no process writes to it")),
                advice=ADVICE["fifo-wait"], ranks=[p.rank] if p.rank is not None else [],
                pids=[p.pid]))
            continue
        if not on_file and p.kernel_state != "D":
            continue
        what = (f"{sc.name} of {sc.target}" if on_file else
                "uninterruptible sleep (D state), typical of a hung filesystem")
        found.append(Diagnosis(
            kind="slow-filesystem",
            summary=f"{p.label} is blocked in {what} in {main_location(p)}",
            advice=ADVICE["slow-filesystem"],
            ranks=[p.rank] if p.rank is not None else [], pids=[p.pid]))
    return found


def dataloader_worker_stuck(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """DL-01: a rank waits for a batch while one of its workers is stuck in dataset code."""
    found = []
    workers = [p for p in _live(processes) if p.role == Role.DATALOADER_WORKER]
    for rank in _live(rank_processes(processes)):
        if not any(bare_name(f) in _DATALOADER_WAIT and "torch/utils/data/dataloader.py" in f.file
                   for f in rank.main_thread.frames):
            continue
        mine = [w for w in workers if w.ppid == rank.pid]
        stuck = [w for w in mine if _worker_in_dataset(w)]
        if stuck:
            detail = "; ".join(
                f"worker pid {w.pid} is in {main_location(w)}"
                + (f" fetching index {w.fetching}" if w.fetching else "")
                + f" ({describe_state(w)})" for w in stuck)
        elif mine:
            detail = (f"all {len(mine)} of its workers are idle, waiting for indices: the batch "
                      "it waits for is held by a worker that died or never started")
        else:
            detail = "no live worker of it was found: they may have died or never started"
        found.append(Diagnosis(
            kind="DL-01",
            summary=f"{rank.label} waits for a DataLoader batch in {main_location(rank)}; {detail}",
            advice=ADVICE["DL-01"], ranks=[rank.rank] if rank.rank is not None else [],
            pids=[rank.pid] + [w.pid for w in stuck]))
    return found


def _worker_in_dataset(worker: ProcessSnapshot) -> bool:
    """A worker is busy with data when its stack goes past the fetcher into other code."""
    frames = worker.main_thread.frames
    return any(f.file.endswith(FETCH_FILE) for f in frames) or any(
        is_user_frame(f) for f in frames)


def lock_after_fork(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """DL-04: a forked child waits on a lock that a thread of its parent held at fork time."""
    by_pid = {p.pid: p for p in processes}
    found = []
    for p in _live(processes):
        parent = by_pid.get(p.ppid)
        forked = parent is not None and parent.cmdline == p.cmdline and p.role != Role.LAUNCHER
        if not forked or not _waits_on_lock(p):
            continue
        found.append(Diagnosis(
            kind="DL-04",
            summary=(f"{p.label}, forked from pid {parent.pid}, waits to acquire a lock in "
                     f"{main_location(p)}: a lock held by another thread of the parent when it "
                     "forked is never released in the child"),
            advice=ADVICE["DL-04"], ranks=[p.rank] if p.rank is not None else [], pids=[p.pid]))
    return found


def _waits_on_lock(p: ProcessSnapshot) -> bool:
    if p.state != ProcessState.BLOCKED or (p.syscall is not None and p.syscall.name != "futex"):
        return False
    thread = p.main_thread
    if any(bare_name(f) in ("acquire", "_acquireLock") and not f.native
           for f in thread.frames[-3:]):
        return True
    inner = innermost_python_frame(thread)
    text = source_line(inner) if inner else ""
    return ".acquire(" in text or (text.startswith("with ") and "lock" in text.lower())


def busy_rank(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """IP-04: a rank burning CPU outside any wait is progressing or looping, not deadlocked."""
    found = []
    for p in _live(rank_processes(processes)):
        if p.state != ProcessState.BUSY or collective_of(p.main_thread) is not None:
            continue
        found.append(Diagnosis(
            kind="IP-04",
            summary=(f"{p.label} is running, not deadlocked ({p.cpu_percent:.0f}% CPU) in "
                     f"{main_location(p)}"),
            advice=ADVICE["IP-04"], ranks=[p.rank] if p.rank is not None else [], pids=[p.pid]))
    return found


RULES: list[Callable[[list[ProcessSnapshot]], list[Diagnosis]]] = [
    collective_split, dataloader_worker_stuck, elastic_rendezvous, rendezvous, network_wait,
    blocking_file_io, lock_after_fork, busy_rank,
]
