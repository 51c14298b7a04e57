"""Interrupting engines that are stuck, as an escalation (WJ-07, IP-02).

A rank blocked inside MPI or gloo does not see SIGINT until the C call returns, which may be
never; ipyparallel's abort() does nothing for a running task. So: SIGINT, and wait a grace
period; then the stacks of those still running (so the evidence is kept before anything is
killed); then SIGTERM; then SIGKILL. Each step reports what it achieved.
"""

from __future__ import annotations

import logging
import signal
import time

from hangkit.jupyter.livestacks import capture_engines, innermost
from hangkit.monitor.merge import format_ranks
from hangkit.monitor.server import pid_alive

log = logging.getLogger(__name__)


def _who(ranks) -> str:
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + format_ranks(ranks)


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


def escalate(cluster, ranks: list[int], *, grace: float = 3.0) -> list[str]:
    report: list[str] = []

    def say(line: str) -> None:
        report.append(line)
        log.warning("interrupt: %s", line)

    still = _running(cluster, ranks)
    if not still:
        say(f"nothing to interrupt: no task is running on {_who(ranks)}")
        return report
    for sig in (signal.SIGINT, None, signal.SIGTERM, signal.SIGKILL):
        if sig is None:  # keep the evidence before anything is killed
            tree, diagnoses = capture_engines(cluster)
            where = "; ".join(f"{_who(set(r) & set(still)) if set(r) & set(still) else _who(r)}"
                              f" at {f}" for r, f in innermost(tree)) or "no stacks"
            say(f"stacks of {_who(still)}: {where}")
            if diagnoses:
                say(f"diagnosis: {diagnoses[0].summary}")
            if cluster._live is not None:
                cluster._live.dashboard.show_stacks(tree, diagnoses,
                                                    note="captured while interrupting")
            continue
        cluster.signal(sig, still)
        before = still
        still = _wait_for(cluster, before, grace)
        ended = sorted(set(before) - set(still))
        name = signal.Signals(sig).name
        if ended:
            say(f"{name} to {_who(before)}: {_who(ended)} stopped"
                + (f"; {_who(still)} did not within {grace:g} s" if still else ""))
        else:
            say(f"{name} to {_who(before)}: no effect within {grace:g} s (blocked in C: a "
                "collective or I/O)")
        if not still:
            break
    if any(line.startswith(("SIGTERM", "SIGKILL")) for line in report):
        say("engines were ended: an MPI job does not survive losing a rank; "
            "cluster.restart() starts new ones")
    return report
