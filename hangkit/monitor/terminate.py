"""Ending every process of a job: SIGTERM, a grace period, then SIGKILL for what is left, and
the shared memory its killed processes could not remove."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from hangkit.monitor.jobtree import JobTree
from hangkit.monitor.roles import ends_by_itself
from hangkit.procfs import remove_unheld_shared_memory, shared_memory_files

# After SIGKILL the kernel needs a moment to take processes down; this bounds that wait.
KILL_WAIT_SECONDS = 5.0
# After their ranks are killed, launchers that clean up after them get this long to do so and
# exit by themselves (hydra removes its topology file from /tmp, a shim reports the exit).
LAUNCHER_WAIT_SECONDS = 2.0
NODE_END_MARGIN = 10.0  # seconds past the grace for a node's relay to say what it ended
_RESCANS = 5


@dataclass
class EndResult:
    # Ended without SIGKILL: by SIGTERM, or (launchers) by themselves once their ranks were killed
    terminated: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)  # needed SIGKILL
    survivors: list[int] = field(default_factory=list)  # still there after everything
    removed: list[str] = field(default_factory=list)  # shared memory left by killed processes


def end_job(tree: JobTree, *, grace: float, clock=time.monotonic) -> EndResult:
    """Ends the whole tree, including processes that ignore SIGTERM or left the session.

    The tree is scanned again after each round, because a process may start children while it
    is being ended (mpiexec cleaning up, a SIGTERM handler that forks).
    """
    result = EndResult()
    procs = _alive(tree.processes())
    shared = shared_memory_files(p.pid for p in procs)
    termed: set[int] = set()
    deadline = clock() + grace
    while procs:
        _signal_all([p for p in procs if p.pid not in termed], signal.SIGTERM)
        termed.update(p.pid for p in procs)
        if clock() >= deadline:
            break
        gone, procs = psutil.wait_procs(procs, timeout=min(0.2, max(deadline - clock(), 0)))
        result.terminated += [p.pid for p in gone]
        procs = _alive(procs + tree.processes())
    # Ranks and workers first: SIGKILLed, the launchers above them would leave their own files.
    procs = _alive(procs + tree.processes())
    leaves = {p.pid for p in procs if not process_ends_by_itself(p)}
    if leaves and len(leaves) < len(procs):
        _signal_all([p for p in procs if p.pid in leaves], signal.SIGKILL)
        gone, procs = psutil.wait_procs(procs, timeout=LAUNCHER_WAIT_SECONDS)
        result.killed += [p.pid for p in gone if p.pid in leaves]
        result.terminated += [p.pid for p in gone if p.pid not in leaves]
    for _ in range(_RESCANS):
        procs = _alive(procs + tree.processes())
        if not procs:
            break
        _signal_all(procs, signal.SIGKILL)
        gone, procs = psutil.wait_procs(procs, timeout=KILL_WAIT_SECONDS)
        result.killed += [p.pid for p in gone if p.pid not in result.killed]
    result.survivors = [p.pid for p in _alive(procs + tree.processes())]
    _reap_orphans(tree)
    result.removed = remove_unheld_shared_memory(shared)
    return result


def process_ends_by_itself(proc: psutil.Process) -> bool:
    """roles.ends_by_itself for a process (False once it is gone)."""
    try:
        return ends_by_itself(proc.cmdline())
    except psutil.Error:
        return False


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    unique = {}
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                unique[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    return list(unique.values())


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            continue


def _reap_orphans(tree: JobTree) -> None:
    """As a subreaper we inherit the job's orphans: collect their exit status, leave no zombies."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        if child.pid == tree.root_pid:
            continue  # the job's first process is waited for by its Popen
        try:
            child.wait(timeout=0)
        except (psutil.TimeoutExpired, psutil.Error):
            continue


def end_nodes(monitor, *, grace: float) -> Callable[[], list[str]]:
    """Asks the relay of every other node (ranks under `hangkit rank`) to end its ranks'
    trees, SIGTERM then SIGKILL after `grace`, all at once and in the background, while the
    caller ends its own node. Returns a function that waits for their answers (a deadline)
    and says, one line per node, what each did. The processes of a node that does not answer
    end with their launcher (mpiexec's daemons end them when it goes)."""
    from hangkit import deadline
    from hangkit.monitor.capture import heard_nodes

    nodes = [n for n in monitor.nodes() if n.host != monitor.host]
    heard = {n.host for n in heard_nodes(monitor, nodes)}
    timeout = grace + NODE_END_MARGIN
    asked = deadline.start(lambda: monitor.ask_nodes("end", sorted(heard), timeout=timeout,
                                                     grace=grace),
                           timeout=timeout + 1.0, name="ending the nodes") if heard else None

    def answers() -> list[str]:
        try:
            replies = asked.result() if asked is not None else {}
        except deadline.DeadlineExceeded:
            replies = {}
        lines = []
        for n in nodes:
            reply = replies.get(n.host)
            if reply is not None:
                done = "; ".join(f"{k}: {v}" for k, v in sorted(
                    (reply.get("answers") or {}).items())) or "nothing left to end"
                lines.append(f"{n.host}: {done}")
            else:
                why = "did not answer" if n.host in heard else "its relay is silent"
                lines.append(f"{n.host}: {why}; its processes end with their launcher")
        return lines

    return answers
