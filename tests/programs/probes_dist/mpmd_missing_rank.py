"""A launcher for the doctor whose last rank never takes part: rank 0 runs the probe's child,
rank 1 is a Python that blocks until killed, printing nothing (so the job's last words on
stderr are the probe's).

Usage, as run_doctor's launcher: mpmd_missing_rank.py MODE CHILD_ARGV...; it execs the MPMD
job `mpiexec -n 1 CHILD_ARGV... : -n 1 python -c BLOCKER`, whose two ranks both see PMI_SIZE=2.
MODE says where rank 1 blocks:
  never-init  before MPI_Init, as a rank stuck importing from a hung filesystem would;
  init-only   after MPI_Init, in no collective: a rank that skipped the others' collective.
"""

import os
import sys
from pathlib import Path

BLOCKERS = {
    "never-init": "import signal; signal.pause()",
    "init-only": "from mpi4py import MPI; MPI.COMM_WORLD.Get_rank(); import signal; "
                 "signal.pause()",
}

mode, child = sys.argv[1], sys.argv[2:]
mpiexec = str(Path(sys.executable).with_name("mpiexec"))
os.execv(mpiexec, [mpiexec, "-n", "1", *child, ":", "-n", "1", sys.executable, "-c",
                   BLOCKERS[mode]])
