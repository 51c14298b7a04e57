"""TD-02 with torch gloo: rank 2 calls broadcast where the others call all_reduce.

Every rank waits inside a collective, so stacks alone show "all in a collective"; the
sequence numbers counted by hangkit.instrument() say who is out of step.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

import hangkit

rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
hangkit.instrument()
grad = torch.ones(8)
for step in range(3):
    hangkit.progress(step=step, phase="train")
    dist.all_reduce(grad)
hangkit.progress(step=3, phase="sync")
if rank == 2:
    dist.broadcast(grad, src=0)
else:
    dist.all_reduce(grad)
