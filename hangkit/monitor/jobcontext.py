"""The job's context for a report: scheduler facts and the environment that matters for hangs."""

from __future__ import annotations

import os
import socket

from hangkit import inject
from hangkit.launcher import nodefile_hosts
from hangkit.redact import redact_environ

_HANG_ENV_PREFIXES = ("WANDB_", "NCCL_", "FI_", "MPICH_", "TORCH_", "MASTER_")
_HANG_ENV_NAMES = ("TMPDIR", "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES",
                   "WORLD_SIZE", "HANG_TIMEOUT")


def job_context(env: dict[str, str]) -> dict:
    context: dict = {"host": socket.gethostname(), "cwd": os.getcwd(),
                     "agents": inject.described(env)}
    if "PBS_JOBID" in env:
        context["pbs_jobid"] = env["PBS_JOBID"]
        hosts = _nodefile_hosts(env.get("PBS_NODEFILE"))
        if hosts:
            nodes = sorted(set(hosts))
            context["nodes"] = len(nodes)
            context["node_names"] = nodes[:64]
        if "NCPUS" in env:
            context["ncpus_per_node"] = env["NCPUS"]
    for name in ("PMI_SIZE", "PALS_LOCAL_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE"):
        if name in env:
            context.setdefault("launcher_env", {})[name] = env[name]
    hang_env = {k: v for k, v in env.items()
                if k.startswith(_HANG_ENV_PREFIXES) or k in _HANG_ENV_NAMES}
    context["environment"] = redact_environ(dict(sorted(hang_env.items())))
    return context


def _nodefile_hosts(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        return nodefile_hosts(path)
    except OSError:  # a report is written whatever the node file does
        return []
