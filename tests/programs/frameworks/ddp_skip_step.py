"""Plain DDP training loop in which one rank skips a step, so the ranks' collectives no longer
pair up.

Launch (3 ranks, gloo on CPU), either with torchrun:

    torchrun --nproc-per-node 3 --master-port 29511 ddp_skip_step.py

or with MPICH (the caller gives MASTER_ADDR/MASTER_PORT; rank and world size come from
PMI_RANK/PMI_SIZE when RANK/WORLD_SIZE are not set):

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 mpiexec -n 3 python ddp_skip_step.py

The hang: rank 1 (the odd rank) "skips a bad batch" at step 3, so it runs out of steps one step
before the others. It leaves the training loop and reaches the post-training `dist.barrier()`
(before rank 0 saves the model), while ranks 0 and 2 are still in their last step (step 5): they
wait in DDP's gradient all_reduce inside `loss.backward()`. Gloo pairs rank 1's barrier with
nothing, and the all_reduce of ranks 0 and 2 never completes. Nothing errors until the
process-group timeout (300 s).

Where each rank waits:
  rank 0, rank 2: `loss.backward()` in train() -> DDP reducer's bucket all_reduce, waited for at
                  the end of the backward (Flight Recorder: gloo:all_reduce)
  rank 1:         `dist.barrier()` in main() (Flight Recorder: gloo:barrier)
"""

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 6
BATCH = 16


def env_int(*names):
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    raise RuntimeError(f"none of {names} is set: launch with torchrun or mpiexec")


def make_data(rank, world_size):
    # Every rank builds the same data and takes its own shard of it.
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS * BATCH * world_size, 32, generator=g)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    return x[rank::world_size], y[rank::world_size]


def train(model, rank, world_size):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    x, y = make_data(rank, world_size)
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        if rank == 1 and step == 3:
            print(f"[rank {rank}] step {step}: bad batch, skipping it", flush=True)
            continue
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        print(f"[rank {rank}] step {step}: loss {loss.item():.4f}", flush=True)


def main():
    rank = env_int("RANK", "PMI_RANK")
    world_size = env_int("WORLD_SIZE", "PMI_SIZE")
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    train(model, rank, world_size)
    print(f"[rank {rank}] training done, waiting for the others before saving", flush=True)
    dist.barrier()
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(os.getcwd(), "ddp_skip_step.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
