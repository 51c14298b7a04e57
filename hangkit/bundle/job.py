"""job.json: the job as the scheduler and the job script describe it (its nodes from
PBS_NODEFILE, ranks per node where known, the PBS_*, PALS_* and PMI_* variables)."""

from __future__ import annotations

from collections.abc import Mapping

from hangkit.launcher import nodefile_hosts
from hangkit.redact import redact_environ, redact_text
from hangkit.text import iso_time

LAUNCH_VARIABLES = ("NNODES", "NRANKS", "NTOTRANKS", "NRANKS_PER_NODE", "RANKS_PER_NODE", "PPN",
                    "NDEPTH", "NTHREADS", "NCPUS", "OMP_NUM_THREADS", "WORLD_SIZE",
                    "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE")
# Where ranks per node may be read, most deliberate first: what the job script says it asked
# for, then what the launcher told a rank (when `hangkit report` runs inside one).
_PER_NODE_NAMES = ("NRANKS_PER_NODE", "RANKS_PER_NODE", "PPN", "PALS_LOCAL_SIZE",
                   "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE")
_TOTAL_NAMES = ("NTOTRANKS", "NRANKS", "PALS_SIZE", "PMI_SIZE", "WORLD_SIZE")


def read_nodefile(environ: Mapping[str, str]) -> tuple[list[str], dict[str, int]]:
    """The job's hosts in PBS_NODEFILE order (as launcher.job_nodes gives them) and how many
    lines each has: PBS repeats a host once per MPI process asked for (mpiprocs). Raises
    OSError: the bundle says why the file could not be read."""
    path = environ.get("PBS_NODEFILE")
    if not path:
        return [], {}
    counts: dict[str, int] = {}
    for h in nodefile_hosts(path):
        counts[h] = counts.get(h, 0) + 1
    return list(counts), counts


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _first_positive(environ: Mapping[str, str], names) -> tuple[int | None, str | None]:
    """The first of these variables that holds a positive whole number, and its name."""
    for name in names:
        value = _positive_int(environ.get(name))
        if value is not None:
            return value, name
    return None, None


def job_config(environ: Mapping[str, str], nodes: list[str], lines_per_host: dict[str, int],
               *, cwd: str, host: str, now: float) -> dict:
    """The job as the scheduler and the job script describe it. Ranks per node come from the
    first of NRANKS_PER_NODE, RANKS_PER_NODE, PPN, PALS_LOCAL_SIZE, MPI_LOCALNRANKS,
    LOCAL_WORLD_SIZE; else from PBS_NODEFILE repeating every host alike (mpiprocs > 1); else
    from a total (NTOTRANKS, NRANKS, PALS_SIZE, PMI_SIZE, WORLD_SIZE) over the nodes."""
    per_node, per_node_from = _first_positive(environ, _PER_NODE_NAMES)
    total, total_from = _first_positive(environ, _TOTAL_NAMES)
    repeats = set(lines_per_host.values())
    if per_node is None and len(repeats) == 1 and min(repeats) > 1:
        per_node, per_node_from = min(repeats), "PBS_NODEFILE (lines per host)"
    if per_node is None and total is not None and nodes and total % len(nodes) == 0:
        per_node, per_node_from = total // len(nodes), f"{total_from} / nodes"
    if total is None and per_node is not None and nodes:
        total, total_from = per_node * len(nodes), "ranks per node x nodes"

    def picked(prefix: str) -> dict[str, str]:
        chosen = {k: environ[k] for k in sorted(environ) if k.startswith(prefix)}
        return {k: redact_text(v) for k, v in redact_environ(chosen).items()}

    return {
        "host": host, "cwd": cwd, "created_at": iso_time(now),
        "in_pbs_job": "PBS_JOBID" in environ,
        "pbs_jobid": environ.get("PBS_JOBID"),
        "pbs_nodefile": environ.get("PBS_NODEFILE"),
        "nodes": nodes, "node_count": len(nodes),
        "ranks_per_node": per_node, "ranks_per_node_from": per_node_from,
        "total_ranks": total, "total_ranks_from": total_from,
        "launch_variables": {k: redact_text(environ[k]) for k in LAUNCH_VARIABLES
                             if k in environ},
        "pbs": picked("PBS_"), "pals": picked("PALS_"), "pmi": picked("PMI_"),
    }
