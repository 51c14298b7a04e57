"""Which part of the job each process plays: launcher, rank, DataLoader worker, or other."""

from __future__ import annotations

import os

from hangkit.bootstrap import is_launcher_program, python_program
from hangkit.monitor.stacks import bare_name
from hangkit.records import ProcessSnapshot, Role
from hangkit.shim import is_helper

# mpiexec and hydra's proxies: they end by themselves once their ranks are gone, cleaning up
# as they go (hydra's topology file in /tmp), so ending a job kills them after their ranks.
SELF_ENDING_NAMES = frozenset({"mpiexec", "mpirun", "mpiexec.hydra", "hydra_pmi_proxy",
                               "hydra_bstrap_proxy"})
# mpiexec and its helpers, schedulers' launchers, and the shells and wrappers between them.
LAUNCHER_NAMES = SELF_ENDING_NAMES | frozenset({
    "mpiexec.gforker", "srun", "aprun", "palsd", "pals_launcher", "orted", "prted", "prterun",
    "ssh", "rsh",  # how hydra reaches other nodes
    "torchrun", "bash", "sh", "dash", "zsh", "ksh", "tcsh", "csh", "env", "timeout", "stdbuf",
    "nohup", "time", "numactl", "taskset", "setsid",
})
# Where torch's DataLoader workers loop, and where they call the dataset.
WORKER_LOOP_FILE = "torch/utils/data/_utils/worker.py"
FETCH_FILE = "torch/utils/data/_utils/fetch.py"


def is_launcher(cmdline: list[str]) -> bool:
    """By the program a process runs: the executable, or for Python the module after -m or the
    script's name (torchrun, accelerate, ...), never a substring: `torchrun_train.py` is a
    rank's script."""
    if not cmdline:
        return False
    if os.path.basename(cmdline[0]) in LAUNCHER_NAMES or is_helper(cmdline):
        return True
    if os.path.basename(cmdline[0]).startswith("python"):
        return is_launcher_program(*python_program(cmdline))
    return False


def _same_script(a: ProcessSnapshot, b: ProcessSnapshot) -> bool:
    kind, name = python_program(a.cmdline)
    return kind == "script" and (kind, name) == python_program(b.cmdline) and \
        a.cmdline[1:] == b.cmdline[1:]


def ends_by_itself(cmdline: list[str]) -> bool:
    """mpiexec, hydra's proxies, and hangkit's shims and relays: gone once their ranks are."""
    return bool(cmdline) and (os.path.basename(cmdline[0]) in SELF_ENDING_NAMES
                              or is_helper(cmdline))


def is_dataloader_worker(snapshot: ProcessSnapshot) -> bool:
    return any(
        bare_name(frame) == "_worker_loop" and frame.file.endswith(WORKER_LOOP_FILE)
        for thread in snapshot.threads for frame in thread.frames
    )


def assign_roles(snapshots: list[ProcessSnapshot], ranks: dict[int, int | None]) -> None:
    """Sets role and rank on each snapshot, in place.

    `ranks` maps pid to the rank found in its environment. A rank process is the topmost
    non-launcher process carrying its rank: the shell mpiexec started for rank 2 is a launcher,
    the python under it is rank 2, and processes below that (DataLoader workers, subprocesses)
    inherit the variable but are not the rank. A Python wrapper that runs mpiexec (no rank of its
    own, ranks below it) counts as a launcher. A job with no rank variables at all (a plain
    `python train.py`) has its topmost non-launcher processes as its ranks, with rank None; in
    a job with rank variables, a process without one directly under a launcher (an ssh to
    another node) is no rank.
    """
    by_pid = {s.pid: s for s in snapshots}
    children: dict[int | None, list[ProcessSnapshot]] = {}
    for s in snapshots:
        children.setdefault(s.ppid, []).append(s)

    def ancestors(s: ProcessSnapshot):
        seen = {s.pid}
        parent = by_pid.get(s.ppid)
        while parent is not None and parent.pid not in seen:
            seen.add(parent.pid)
            yield parent
            parent = by_pid.get(parent.ppid)

    def descendants(s: ProcessSnapshot):
        stack, seen = list(children.get(s.pid, [])), {s.pid}
        while stack:
            d = stack.pop()
            if d.pid not in seen:
                seen.add(d.pid)
                yield d
                stack.extend(children.get(d.pid, []))

    for s in snapshots:
        s.rank = ranks.get(s.pid)
        if is_launcher(s.cmdline):
            s.role = Role.LAUNCHER
    # Where ranks carry their numbers, a process without one is a helper, never a rank.
    numbered = any(r is not None for r in ranks.values())
    # Parents before children, so an inherited rank is known when a child is looked at.
    for s in sorted(snapshots, key=lambda s: sum(1 for _ in ancestors(s))):
        if s.role == Role.LAUNCHER:
            continue
        upper = [a for a in ancestors(s) if a.role != Role.LAUNCHER]
        if s.rank is not None and all(a.rank != s.rank for a in upper):
            s.role = Role.RANK
        elif s.rank is None and (ranked := [d for d in descendants(s) if d.rank is not None]):
            # Lightning's launcher is rank 0 itself: it runs its script again for the others.
            again = [d for d in ranked if d.ppid == s.pid and _same_script(s, d)]
            s.role = Role.RANK if again else Role.LAUNCHER
            if again and 0 not in {d.rank for d in ranked}:
                s.rank = 0
        elif s.rank is None and not upper and not numbered:
            s.role = Role.RANK
        else:
            s.role = Role.DATALOADER_WORKER if is_dataloader_worker(s) else Role.OTHER
            if s.rank is None:
                s.rank = next((a.rank for a in upper if a.role == Role.RANK), None)
