"""MPI ranks that ignore SIGTERM, rank 1 elsewhere while the others wait in a Barrier: ending
the job needs SIGKILL, and the ranks' shared memory (MPICH removes it only in MPI_Finalize) and
hydra's topology file must not be left behind."""

import signal
import threading

from hangprog import heartbeat, ready

signal.signal(signal.SIGTERM, signal.SIG_IGN)
heartbeat()

from mpi4py import MPI  # noqa: E402

comm = MPI.COMM_WORLD
comm.Barrier()  # everyone is up: the segment is mapped by every rank
ready(rank=comm.rank)
if comm.rank == 1:
    threading.Event().wait()
comm.Barrier()
