"""Plain DDP training loop whose data is split across the ranks by hand, unevenly: the last rank
gets one batch fewer than the others, runs out of data first and leaves the loop early.

Launch with MPICH (3 ranks, gloo on CPU; the caller gives MASTER_ADDR/MASTER_PORT, rank and world
size come from PMI_RANK/PMI_SIZE, or from RANK/WORLD_SIZE when those are set):

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29601 mpiexec -n 3 python ddp_uneven_shards.py

The hang: the training set is 14 shards of 16 samples, and each rank takes a contiguous chunk of
`ceil(14 / 3) = 5` shards: ranks 0 and 1 get 5 shards each, rank 2 (the odd rank) gets the 4
that are left. All ranks train one step per shard, so after step 3 (its fourth step) rank 2 has
no data left: it ran out at step 4, the step that ranks 0 and 1 are in. Rank 2 leaves the loop
and waits in the post-training `dist.barrier()`, while ranks 0 and 1 wait in step 4's DDP
gradient all_reduce inside `loss.backward()`. Gloo pairs rank 2's barrier with nothing, and the
all_reduce never completes. Nothing errors until the process-group timeout (300 s).

Where each rank waits:
  rank 0, rank 1: `loss.backward()` in train() (step 4) -> DDP reducer's bucket all_reduce,
                  waited for at the end of the backward (Reducer::finalize_backward;
                  Flight Recorder: gloo:all_reduce)
  rank 2:         `dist.barrier()` in main() (Flight Recorder: gloo:barrier)
"""

import datetime
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

SHARDS = 14
SHARD_SIZE = 16


def env_int(*names):
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    raise RuntimeError(f"none of {names} is set: launch with mpiexec or torchrun")


def load_shards():
    # Every rank builds the same list of shards (in real life: the list of data files).
    g = torch.Generator().manual_seed(1234)
    shards = []
    for _ in range(SHARDS):
        x = torch.randn(SHARD_SIZE, 32, generator=g)
        shards.append((x, (x.sum(dim=1, keepdim=True) > 0).float()))
    return shards


def my_shards(shards, rank, world_size):
    per_rank = math.ceil(len(shards) / world_size)
    return shards[rank * per_rank:(rank + 1) * per_rank]


def train(model, rank, world_size):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    shards = my_shards(load_shards(), rank, world_size)
    print(f"[rank {rank}] {len(shards)} shards", flush=True)
    for step, (xb, yb) in enumerate(shards):
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        print(f"[rank {rank}] step {step} loss {loss.item():.4f}", flush=True)


def main():
    rank = env_int("RANK", "PMI_RANK")
    world_size = env_int("WORLD_SIZE", "PMI_SIZE")
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    train(model, rank, world_size)
    print(f"[rank {rank}] epoch done", flush=True)
    dist.barrier()
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(os.getcwd(), "ddp_uneven_shards.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
