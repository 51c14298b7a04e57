"""Interrupting engines that are stuck, as an escalation (WJ-07, IP-02).

A rank blocked inside MPI or gloo does not see SIGINT until the C call returns, which may be
never; ipyparallel's abort() does nothing for a running task. So: SIGINT, and wait a grace
period; then the stacks of those still running (so the evidence is kept before anything is
killed); then SIGTERM; then SIGKILL. Each step reports what it achieved.

One rank can be interrupted alone (stop_at_sigint): a KeyboardInterrupt into its code, which
its engine survives, where it runs Python. Ending an engine would end them all: MPICH ends the
job when a rank dies.
"""

from __future__ import annotations

import logging
import signal
import time

from hangkit.jupyter.livestacks import capture_engines, innermost
from hangkit.procfs import pid_alive
from hangkit.text import ranks_phrase

log = logging.getLogger(__name__)

def _running(cluster, ranks: list[int]) -> list[int]:
    """The ranks whose latest task is still running and whose engine is still alive (an
    engine that exited stays a zombie until its MPI launcher reaps it: not alive)."""
    tasks = cluster.latest
    states = tasks.states() if tasks is not None else {}
    out = []
    for r in ranks:
        info = cluster.engines[r]
        if info["host"] == cluster.monitor.host and not pid_alive(info["pid"]):
            continue
        if tasks is None or states.get(r) == "running":
            out.append(r)
    return out


def _wait_for(cluster, ranks: list[int], grace: float) -> list[int]:
    deadline = time.monotonic() + grace
    still = _running(cluster, ranks)
    while still and time.monotonic() < deadline:
        time.sleep(0.05)  # ok-sleep: polls task and process states against the grace period
        still = _running(cluster, still)
    return still


def _signal(cluster, sig: int, ranks: list[int], grace: float, say) -> list[int]:
    """Sends sig to the ranks' engines and waits; says what it achieved; returns those whose
    task still runs."""
    cluster.signal(sig, ranks)
    still = _wait_for(cluster, ranks, grace)
    ended = sorted(set(ranks) - set(still))
    name = signal.Signals(sig).name
    if ended:
        say(f"{name} to {ranks_phrase(ranks)}: {ranks_phrase(ended)} stopped"
            + (f"; {ranks_phrase(still)} did not within {grace:g} s" if still else ""))
    else:
        say(f"{name} to {ranks_phrase(ranks)}: no effect within {grace:g} s (blocked in C: a "
            "collective or I/O)")
    return still


def _keep_stacks(cluster, still: list[int], say) -> None:
    tree, diagnoses = capture_engines(cluster)
    where = "; ".join(f"{ranks_phrase(set(r) & set(still) or r)} at {f}"
                      for r, f in innermost(tree)) or "no stacks"
    say(f"stacks of {ranks_phrase(still)}: {where}")
    if diagnoses:
        say(f"diagnosis: {diagnoses[0].summary}")
    if cluster.live is not None:
        cluster.live.dashboard.show_stacks(tree, diagnoses, note="captured while interrupting")


def _after_sigint(cluster, interrupted: list[int], still: list[int], say) -> None:
    """What a KeyboardInterrupt alone achieved, and what to do where it could not."""
    stopped = sorted(set(interrupted) - set(still))
    if stopped:
        say(f"{ranks_phrase(stopped)} raised KeyboardInterrupt in the cell's code; "
            f"{'its engine goes' if len(stopped) == 1 else 'their engines go'} on, "
            "namespace kept, and so do the other ranks")
    if still:
        _keep_stacks(cluster, still, say)
        say(f"{ranks_phrase(still)} {'is' if len(still) == 1 else 'are'} inside a C call (a "
            "collective, I/O): Python raises the KeyboardInterrupt only when that call "
            "returns, which a collective whose peers never come never does. "
            "cluster.interrupt() escalates to SIGTERM and SIGKILL, which ends the MPI job; "
            "cluster.restart() then starts new engines")


def escalate(cluster, ranks: list[int], *, grace: float = 3.0,
             stop_at_sigint: bool = False) -> list[str]:
    """The escalation on these ranks, one line per step. `stop_at_sigint`: only the
    KeyboardInterrupt, for one rank's Python code; the engines are never ended then."""
    report: list[str] = []

    def say(line: str) -> None:
        report.append(line)
        log.warning("interrupt: %s", line)

    still = _running(cluster, ranks)
    if not still:
        say(f"nothing to interrupt: no task is running on {ranks_phrase(ranks)}")
        return report
    interrupted = still
    still = _signal(cluster, signal.SIGINT, still, grace, say)
    if stop_at_sigint:
        _after_sigint(cluster, interrupted, still, say)
        return report
    if still:  # the evidence is kept before anything is killed
        _keep_stacks(cluster, still, say)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not still:
            break
        still = _signal(cluster, sig, still, grace, say)
    if any(line.startswith(("SIGTERM", "SIGKILL")) for line in report):
        say("engines were ended: an MPI job does not survive losing a rank; "
            "cluster.restart() starts new ones")
    return report
