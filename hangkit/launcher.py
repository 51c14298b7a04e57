"""Starting ranks: the MPI launcher of this machine or of the PBS job, and free ports."""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
from pathlib import Path

from hangkit.errors import HangkitError


def find_mpiexec() -> str:
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise HangkitError("mpiexec not found",
                           hint="install the local-mpi extra: pip install 'hangkit[local-mpi]'")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_nodes(environ=os.environ) -> list[str]:
    """The PBS job's hosts, in PBS_NODEFILE order (one line per host on Polaris)."""
    path = environ.get("PBS_NODEFILE")
    if not path:
        return []
    try:
        with open(path) as f:
            hosts = [line.strip() for line in f if line.strip()]
    except OSError:
        return []
    return list(dict.fromkeys(hosts))


def mpiexec_command(ranks: int, environ=os.environ) -> list[str]:
    """mpiexec for `ranks` ranks: on this machine, or across a PBS job's nodes with the flags
    Cray PALS takes (--hostfile, --ppn). Outside PBS, MPICH's hydra runs them locally."""
    command = [find_mpiexec(), "-n", str(ranks)]
    nodes = job_nodes(environ)
    if nodes:
        command += ["--hostfile", environ["PBS_NODEFILE"],
                    "--ppn", str(math.ceil(ranks / len(nodes)))]
    return command
