"""Starting ranks and their rendezvous: the MPI launcher of this machine or of the PBS job,
ports (free, derived from the job, held by whom), and waiting for a listener."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import sys
import time
import zlib
from pathlib import Path

from hangkit.errors import HangkitError

# Where a port derived from PBS_JOBID lies: below Linux's ephemeral range (32768-60999), so no
# outgoing connection holds it, and away from torchrun's default 29500.
DERIVED_PORT_BASE, DERIVED_PORT_SPAN = 21000, 8000


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


def nodefile_hosts(path: str | os.PathLike) -> list[str]:
    """Every host line of a PBS node file, stripped, in order, repeats kept: PBS repeats a host
    once per MPI process asked for (mpiprocs). The one reader of PBS_NODEFILE; raises OSError,
    so each caller decides whether an unreadable file is worth saying."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def job_nodes(environ=os.environ) -> list[str]:
    """The PBS job's hosts, in PBS_NODEFILE order (one line per host on Polaris)."""
    path = environ.get("PBS_NODEFILE")
    if not path:
        return []
    try:
        hosts = nodefile_hosts(path)
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


def derived_port(job_id: str) -> int:
    """A port every rank of one job computes alike, without talking to each other."""
    return DERIVED_PORT_BASE + zlib.crc32(job_id.encode()) % DERIVED_PORT_SPAN


def wait_for_listener(addr: str, port: int, deadline: float, *, retry: float = 0.1) -> None:
    """Connects until something accepts at addr:port, or raises TimeoutError with the last
    error (refused: nothing listens; timed out or unreachable: no route). A store client would
    retry all of these alike, with backoff, overrunning its timeout."""
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(last)
        try:
            with socket.create_connection((addr, port), timeout=min(left, 2.0)):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
            time.sleep(min(retry, max(left, 0)))


def port_holder(port: int) -> str | None:
    """Which process listens on `port` ("port in use by whom"); None when the kernel does not
    say."""
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return "a process of another user"
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(conn.pid)
                    return f"pid {conn.pid} ({' '.join(proc.cmdline())[:120]})"
                return f"pid {conn.pid}"
    return None
