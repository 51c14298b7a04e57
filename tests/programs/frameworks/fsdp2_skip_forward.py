"""FSDP2 (fully_shard) training loop on CPU in which one rank skips a forward, so the ranks'
collectives no longer pair up.

Launch (3 ranks, gloo on CPU):

    torchrun --nproc-per-node 3 --master-port 29521 fsdp2_skip_forward.py

The hang: rank 1 (the odd rank) drops a batch at step 3 ("a bad batch is skipped on this rank")
and so skips that step's forward, backward and optimizer step. It runs out of batches one step
before the others, leaves the training loop and reaches the post-training `dist.barrier()`
(before rank 0 saves the model). Ranks 0 and 2 are still in their last step (step 5): they wait
in FSDP's parameter all-gather in the root module's pre-forward hook, inside `model(xb)`. The
barrier pairs with nothing and the all-gather never completes; nothing errors until the
process-group timeout (300 s).

Where each rank waits:
  rank 0, rank 2: `loss = loss_fn(model(xb), yb)` in train() -> FSDPParamGroup.pre_forward ->
                  unshard -> foreach_all_gather -> dist.all_gather_single
                  (Flight Recorder: gloo:all_gather)
  rank 1:         `dist.barrier()` in main() (Flight Recorder: gloo:barrier)

(On gloo, FSDP2's gradient reduction is an all_reduce, not a reduce_scatter; the 1-D CPU mesh
uses the default process group, so every collective here is on group "0".)
"""

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

STEPS = 6
BATCH = 16


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.ReLU()),
                                     nn.Sequential(nn.Linear(64, 64), nn.ReLU())])
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def make_data(rank, world_size):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS * BATCH * world_size, 32, generator=g)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    return x[rank::world_size], y[rank::world_size]


def train(model, rank, world_size):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    x, y = make_data(rank, world_size)
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        if rank == 1 and step == 3:
            print(f"[rank {rank}] step {step}: bad batch, skipping it", flush=True)
            continue
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"[rank {rank}] step {step}: loss {loss.item():.4f}", flush=True)


def main():
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = MLP()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(model, rank, world_size)
    print(f"[rank {rank}] training done, waiting for the others before saving", flush=True)
    dist.barrier()
    if rank == 0:
        print("[rank 0] saving", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
