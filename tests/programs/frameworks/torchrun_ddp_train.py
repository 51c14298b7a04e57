"""Plain DDP training script (its file name starts with "torchrun", as users' scripts sometimes
do) in which one rank leaves the training loop to evaluate on its own, and that evaluation never
returns.

Launch (3 ranks, gloo on CPU; the evaluation feed is a named pipe created under the directory
given as the first argument, default the current one):

    torchrun --nproc-per-node 3 --master-port 29571 torchrun_ddp_train.py [FEED_DIR]

The hang: at step 3 rank 2 (the odd rank) runs `evaluate(model, feed_dir)` before its training
step. evaluate() reads its validation batch from a named pipe (`FEED_DIR/eval_feed.fifo`) that
an evaluation-data feeder was meant to write, and no feeder runs: `open()` of a FIFO for reading
blocks until a writer opens it, so rank 2 waits in a plain file open, in no collective at all.
Ranks 0 and 1 go on to step 3's training step and wait in DDP's gradient all_reduce inside
`loss.backward()`, which rank 2 never joins. Nothing errors until the process-group timeout
(300 s) on ranks 0 and 1; rank 2 would wait in open() forever.

Where each rank waits:
  rank 0, rank 1: `loss.backward()` in train() (step 3) -> DDP reducer's bucket all_reduce,
                  waited for at the end of the backward (Flight Recorder: gloo:all_reduce)
  rank 2:         `with open(fifo, "rb") as feed:` in evaluate() (called from train() at
                  step 3): the open(2) of the FIFO, outside torch

The FIFO stays behind in FEED_DIR (rank 2 creates it if it is missing).
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 6
BATCH = 16
EVAL_STEP = 3


def make_data(rank, world_size):
    # Every rank builds the same data and takes its own shard of it.
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS * BATCH * world_size, 32, generator=g)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    return x[rank::world_size], y[rank::world_size]


def evaluate(model, feed_dir):
    # The validation batch arrives through a pipe written by a separate feeder process.
    fifo = os.path.join(feed_dir, "eval_feed.fifo")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    with open(fifo, "rb") as feed:
        xb = torch.frombuffer(bytearray(feed.read(BATCH * 32 * 4)), dtype=torch.float32)
    with torch.no_grad():
        return model.module(xb.view(BATCH, 32)).sigmoid().mean().item()


def train(model, rank, world_size, feed_dir):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    x, y = make_data(rank, world_size)
    for step in range(STEPS):
        if rank == 2 and step == EVAL_STEP:
            print(f"[rank {rank}] step {step}: evaluating", flush=True)
            print(f"[rank {rank}] eval score {evaluate(model, feed_dir):.4f}", flush=True)
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        print(f"[rank {rank}] step {step}: loss {loss.item():.4f}", flush=True)


def main():
    feed_dir = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    train(model, rank, world_size, feed_dir)
    dist.barrier()
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(os.getcwd(), "torchrun_ddp_train.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
