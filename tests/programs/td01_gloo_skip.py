"""TD-01 with torch gloo: rank 2 skips the all_reduce the other ranks wait in."""

from hangprog import heartbeat, ready

heartbeat()

import os  # noqa: E402
import threading  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def checkpoint_on_rank_2():
    threading.Event().wait()


def main():
    rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    dist.barrier()
    ready(rank=rank)
    grad = torch.ones(8)
    if rank == 2:
        checkpoint_on_rank_2()
    dist.all_reduce(grad)


main()
