"""The notebooks' training: a small DDP model on synthetic data, built from hangkit.training.

`build_runner` runs on every engine (cluster.setup(build_runner, ...)); it returns the
StepRunner the notebook then drives cell by cell. `hang_raise_then_barrier` produces IP-01 on
purpose on the engines, for notebook 03.
"""

from __future__ import annotations

import os
import threading


class _StuckAt:
    """A dataset wrapper: one rank's worker blocks forever on one sample (DL-01), on purpose."""

    def __init__(self, dataset, stuck_index: int | None):
        self.dataset, self.stuck_index = dataset, stuck_index

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i == self.stuck_index:
            threading.Event().wait()  # a worker stuck on a dead mount
        return self.dataset[i]


def build_runner(master_port: int, *, epochs: int = 2, samples: int = 512, batch_size: int = 32,
                 num_workers: int = 1, hidden: int = 32, timeout: float = 20.0,
                 stuck_worker_rank: int | None = None, seed: int = 0):
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler, TensorDataset

    from hangkit.training import (
        ErrorFlag,
        StepRunner,
        check_even_batches,
        init_distributed,
        safe_dataloader,
    )
    from hangkit.training.distributed import get_store

    torch.manual_seed(seed)
    if get_store() is None:  # once per engine process: a process group lives as long
        init_distributed("gloo", timeout=timeout, master_addr=os.environ.get(
            "HANGKIT_MASTER_ADDR", "127.0.0.1"), master_port=master_port)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    centres = torch.randn(4, 16) * 3
    labels = torch.randint(0, 4, (samples,))
    inputs = centres[labels] + torch.randn(samples, 16)
    dataset = TensorDataset(inputs, labels)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, drop_last=True)
    stuck = next(iter(sampler)) if stuck_worker_rank == rank else None
    stuck_at = _StuckAt(dataset, None)
    loader = safe_dataloader(stuck_at, batch_size=batch_size, sampler=sampler,
                             num_workers=num_workers, drop_last=True, timeout=timeout,
                             test_timeout=timeout)
    if stuck is not None:  # after the test batch: the hang comes in training, not before
        stuck_at.stuck_index = stuck  # workers fork per epoch, and inherit it
    check_even_batches(len(loader), timeout=timeout)
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train_step(batch, phase):
        x, y = batch
        phase("forward")
        loss = torch.nn.functional.cross_entropy(model(x), y)
        phase("backward")
        optimizer.zero_grad()
        loss.backward()
        phase("optimizer")
        optimizer.step()
        return {"loss": loss.item()}

    def epoch_start(epoch):
        sampler.set_epoch(epoch)

    return StepRunner(train_step, loader, epochs=epochs, on_epoch_start=epoch_start,
                      error_flag=ErrorFlag(timeout=timeout * 3))


def hang_raise_then_barrier(bad_rank: int) -> str:
    """IP-01: rank `bad_rank` raises; the others wait in an MPI barrier for it."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() == bad_rank:
        raise ValueError(f"rank {bad_rank}: a bad sample (on purpose)")
    comm.Barrier()
    return "passed the barrier"

