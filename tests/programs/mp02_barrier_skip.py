"""MP-02 / TD-01 with MPI: rank 2 never reaches the Barrier the other ranks wait in."""

from hangprog import heartbeat, ready

heartbeat()

import threading  # noqa: E402

from mpi4py import MPI  # noqa: E402


def evaluate_on_rank_2():
    threading.Event().wait()  # rank-only work that never finishes


def main():
    comm = MPI.COMM_WORLD
    comm.Barrier()  # everyone is up
    ready(rank=comm.rank)
    if comm.rank == 2:
        evaluate_on_rank_2()
    comm.Barrier()


main()
