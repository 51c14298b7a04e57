"""Lockstep MPI training where rank 1 works 8x longer per step than the others, which wait for
it in Barrier: every rank takes the same steps per second, so only time outside collectives
(counted by hangkit.instrument()) tells the straggler apart. Runs until ended."""

import time

from mpi4py import MPI

import hangkit

hangkit.instrument()
comm = MPI.COMM_WORLD
work = 0.16 if comm.Get_rank() == 1 else 0.02
for step in range(100_000):
    hangkit.progress(step=step, phase="compute")
    time.sleep(work)  # ok-sleep: stands in for the forward and backward pass
    hangkit.progress(phase="sync")
    comm.Barrier()
