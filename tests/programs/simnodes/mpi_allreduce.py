"""One MPI allreduce across the simulated nodes: prints "rank host sum" (sum of rank+1)."""

import socket
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1, op=MPI.SUM)
# One write per line (print writes its end apart when unbuffered): ranks share the
# stdout that mpiexec forwards.
sys.stdout.write(f"{comm.Get_rank()} {socket.gethostname()} {total}\n")
sys.stdout.flush()
