"""TD-02 / MP-02 under MPI: rank 2 calls Barrier where the others call allreduce.

MPICH tags each collective kind differently, so the mismatched calls never match: every rank
waits inside a collective, and only sequence numbers say who is out of step.
"""

from mpi4py import MPI

import hangkit
from hangkit import progress

hangkit.instrument()
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
for step in range(3):
    progress(step=step, phase="train")
    comm.allreduce(step)
progress(step=3, phase="sync")
if rank == 2:
    comm.Barrier()
else:
    comm.allreduce(3)
