"""A small real data-parallel training job (torch gloo, started by mpiexec) with a planted hang.

After a few steps, rank 2 leaves the training loop to save a checkpoint whose open() never
returns, while the other ranks wait for it in the gradient all-reduce (catalogue case TD-01).
Each step reports its progress, as a monitored training loop does: under `hangkit watch` that
starts the rank's agent, which also sends torch's Flight Recorder at capture.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

import hangkit

STEPS = 1000
WANDER_AT_STEP = 3


def save_checkpoint(model, path):
    # A FIFO with no writer: open() blocks like a read on a hung shared filesystem.
    if not os.path.exists(path):
        os.mkfifo(path)
    with open(path, "rb") as f:
        f.read()
    torch.save(model.state_dict(), path + ".pt")


def average_gradients(model, world_size):
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world_size


def main():
    rank = int(os.environ.get("PMI_RANK", "0"))
    world_size = int(os.environ.get("PMI_SIZE", "1"))
    wanderer = int(os.environ.get("HANGKIT_DEMO_WANDERER", "2"))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    torch.manual_seed(rank)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    # Same initial weights everywhere, as DDP would broadcast them.
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    true_w = torch.linspace(-1, 1, 16)
    checkpoint = os.path.join(os.environ.get("HANGKIT_DEMO_DIR", "."), "checkpoint")
    for step in range(STEPS):
        hangkit.progress(step=step)
        x = torch.randn(64, 16)
        y = (x @ true_w).unsqueeze(1) + 0.01 * torch.randn(64, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if rank == wanderer and step == WANDER_AT_STEP:
            save_checkpoint(model, checkpoint)  # only this rank: the others wait below
        average_gradients(model, world_size)
        optimizer.step()
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
