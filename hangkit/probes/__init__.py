"""The doctor's probes: each a module with run(ctx) -> Outcome, run in a child process per
probe (per rank) with its deadline, so a probe that hangs or crashes only times out or fails.

The names are part of the contract (`hangkit doctor --only NAME,...`, the JSON's "name").
Modules are imported only inside the probe's child, by name, so a probe whose imports hang
cannot hang the doctor.
"""

from __future__ import annotations

from hangkit.errors import UsageError

# name -> module; the order is the table's.
REGISTRY = {
    "environment": "hangkit.probes.environment",
    "af_unix": "hangkit.probes.af_unix",
    "shm": "hangkit.probes.shm",
    "imports": "hangkit.probes.imports",
    "torch_multiprocessing": "hangkit.probes.torch_multiprocessing",
    "mpi": "hangkit.probes.mpi",
    "torch_distributed": "hangkit.probes.torch_distributed",
    "wandb": "hangkit.probes.wandb",
    "dataloader": "hangkit.probes.dataloader",
    "filesystem": "hangkit.probes.filesystem",
    "tqdm": "hangkit.probes.tqdm",
    "stack_capture": "hangkit.probes.stack_capture",
    "polaris": "hangkit.probes.polaris",
}
PROBE_NAMES = tuple(REGISTRY)

# Advice for a probe the doctor had to kill: kept here, not in the probe modules, so the
# doctor's own process never imports them.
TIMEOUT_ADVICE = {
    "mpi": ("MPI did not complete on every rank: a rank that never calls MPI_Init (stuck "
            "before it, or not an MPI program) keeps the others waiting, as does a rank that "
            "skips a collective (MP-02). Check every rank's last words and the launcher's rank "
            "count; started outside mpiexec, see MP-05."),
    "torch_distributed": ("Rendezvous or a collective did not complete (TD-05): MASTER_ADDR "
                          "must be the first host of PBS_NODEFILE, MASTER_PORT free, and "
                          "WORLD_SIZE the number of ranks launched."),
    "filesystem": ("I/O under --path stalled: the filesystem is hung or very slow (DL-01). "
                   "Stage data to node-local storage and give DataLoader a timeout."),
    "imports": ("An import never finished: a module on a stalled shared filesystem, or one "
                "that initialises something at import (MPI, CUDA). Run it alone with "
                "python -X importtime."),
}


def select(only: str | list[str] | None, *, name: str = "only") -> list[str]:
    """The probes named by `only` (comma-separated), in table order; all when None. `name`:
    what errors call it (the CLI's "--only")."""
    if only is None:
        return list(PROBE_NAMES)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UsageError(f"unknown probe {', '.join(map(repr, unknown))}; known: "
                         + ", ".join(PROBE_NAMES))
    if not names:
        raise UsageError(f"{name} names no probe")
    return [n for n in PROBE_NAMES if n in names]
