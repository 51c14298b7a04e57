"""A DDP training loop on gloo, timed: WARMUP steps, then STEPS steps; rank 0 prints
`steps_per_second=X`. Run under mpiexec; the Flight Recorder is on or off by the environment
(TORCH_FR_BUFFER_SIZE). Usage: ddp_steps.py STEPS"""

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

WARMUP = 20

rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
torch.manual_seed(rank)
# Several gradient buckets a step (bucket_cap_mb is small), as a larger model would have.
model = DistributedDataParallel(torch.nn.Sequential(
    torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 64)), bucket_cap_mb=0.1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
batch = torch.randn(32, 64)


def step():
    loss = model(batch).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


steps = int(sys.argv[1])
for _ in range(WARMUP):
    step()
dist.barrier()
started = time.perf_counter()
for _ in range(steps):
    step()
dist.barrier()
if rank == 0:
    print(f"steps_per_second={steps / (time.perf_counter() - started):.2f}", flush=True)
# Every rank is past the barrier. Tearing gloo down at exit sometimes aborts ("terminate
# called without an active exception"), which would lose a run for nothing.
os._exit(0)
