"""Hangs whose collectives only torch's Flight Recorder sees: DDP's, issued from C++ in the
backward pass, and a gloo subgroup's. Usage: flight_recorder_ddp.py skip|subgroup|async|gil

- skip: rank 1 leaves step 3 to read a checkpoint from a FIFO nobody writes; the other ranks
  wait in DDP's gradient all-reduce, issued from loss.backward().
- subgroup: ranks 0 and 1 share a group; rank 1 never calls its all_reduce. The default
  group is fine: rank 2 waits outside any collective.
- async: ranks 0 and 2 issue an all_reduce with async_op=True and wait() for it later; rank 1
  never issues it.
- gil: rank 1 leaves step 3 for one long C call that holds the GIL: its agent cannot answer,
  so it sends no recorder dump, while the others wait in DDP's all-reduce.
Every rank calls hangkit.progress() each step, as a monitored training loop does.
"""

import os
import sys

from hangprog import heartbeat, ready, scratch

heartbeat()

import threading  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import hangkit  # noqa: E402

STEPS, ODD_STEP = 5, 3


def read_checkpoint(path):
    with open(path, "rb") as f:  # blocks: no process ever opens the FIFO for writing
        return f.read()


def evaluate_on_rank_1():
    threading.Event().wait()


def wait_for_the_others():
    threading.Event().wait()


def hold_the_gil():
    return sum(range(10**13))  # one C call: the GIL is never released between bytecodes


def main():
    mode = sys.argv[1]
    rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    pair = dist.new_group([0, 1])  # every rank creates every group, as torch requires
    torch.manual_seed(rank)
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    fifo = scratch("checkpoint.pt")
    if rank == 1 and mode == "skip":
        os.mkfifo(fifo)
    for step in range(STEPS):
        if step == ODD_STEP:
            ready(rank=rank)
            if mode == "skip" and rank == 1:
                read_checkpoint(fifo)
            elif mode == "gil" and rank == 1:
                hangkit.agent.current_agent().reported.wait(30)  # known to the monitor first
                hold_the_gil()
            elif mode == "subgroup":
                if rank == 0:
                    dist.all_reduce(torch.ones(4), group=pair)
                elif rank == 1:
                    evaluate_on_rank_1()
                else:
                    wait_for_the_others()
            elif mode == "async":
                if rank == 1:
                    evaluate_on_rank_1()
                work = dist.all_reduce(torch.ones(6), async_op=True)
                hangkit.progress(step=step, phase="metrics")
                work.wait()
        loss = model(torch.randn(4, 8)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        hangkit.progress(step=step)


main()
