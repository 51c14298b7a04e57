"""A plain training job for `hangkit attach`: nothing of hangkit's, started by mpiexec alone.

Each rank joins a gloo group (its rank and size from MPI's PMI_RANK and PMI_SIZE), starts a
DataLoader with 2 workers, and trains a tiny model with DDP.

    attach_job.py hang      rank WANDERING leaves after step 3 (wander_off), the others wait
                            in the next step's allreduce; each rank writes its readiness
                            record once it is there
    attach_job.py healthy   every rank trains for STEPS steps, printing nothing, and exits 0;
                            the ready record is written at the first step

Readiness records go to $HANGKIT_READY_DIR/rank-N.json (written whole: renamed into place).
"""

import json
import os
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

WANDERING = int(os.environ.get("ATTACH_JOB_WANDERING", "1"))
STEPS = int(os.environ.get("ATTACH_JOB_STEPS", "3000"))


class Samples(Dataset):
    def __len__(self):
        return 1 << 30

    def __getitem__(self, i):
        return torch.full((8,), float(i % 7))


def ready(rank: int, **info) -> None:
    directory = os.environ["HANGKIT_READY_DIR"]
    path = os.path.join(directory, f"rank-{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "pid": os.getpid(), **info}, f)
    os.replace(path + ".tmp", path)


def wander_off() -> None:
    threading.Event().wait()  # a rank that never comes back to the collective


def main() -> int:
    mode = sys.argv[1]
    rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(Samples(), batch_size=4, num_workers=2, persistent_workers=True)
    for step, batch in enumerate(loader):
        if mode == "hang" and step == 3:
            workers = [p.pid for p in loader._iterator._workers]  # noqa: SLF001 - the test's
            ready(rank, workers=workers)
            if rank == WANDERING:
                wander_off()
        if mode == "healthy" and step == 0:
            ready(rank, workers=[p.pid for p in loader._iterator._workers])  # noqa: SLF001
        if mode == "healthy" and step == STEPS:
            break
        optimizer.zero_grad()
        model(batch).sum().backward()  # the gradients' allreduce: where the others wait
        optimizer.step()
    dist.destroy_process_group()
    return 0


sys.exit(main())
