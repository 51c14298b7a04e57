"""Hang-safe building blocks for training code, used in every rank:

- `safe_dataloader`: a deadline on every batch, test-before-use, fallback to fewer workers,
  worker states published to the monitor, errors that name the worker, index and stack;
- `init_distributed`, `barrier`, `mpi_barrier`, `ErrorFlag`, `check_even_batches`,
  `install_mpi_excepthook`: rendezvous and barriers with deadlines that name the missing
  ranks, and one rank's exception reaching the others at the next step boundary;
- `init_wandb`, `guarded`: tracker init under a deadline, offline before a second try, never
  blocking training;
- `StepRunner`: phases through hangkit.progress(), N steps at a time, failed epochs survived,
  cleanup always;
- `setup_environment`, `progress_bar`.

Names are imported on first use, so `import hangkit.training` loads neither torch, mpi4py
nor wandb.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "safe_dataloader": "dataloader", "SafeDataLoader": "dataloader",
    "DataLoaderHang": "dataloader", "DataLoaderWorkerDied": "dataloader",
    "init_distributed": "distributed", "barrier": "distributed", "mpi_barrier": "distributed",
    "ErrorFlag": "distributed", "check_even_batches": "distributed",
    "install_mpi_excepthook": "distributed", "BarrierTimeout": "distributed",
    "CollectiveTimeout": "distributed", "DistributedError": "distributed",
    "PeerFailed": "distributed", "RendezvousError": "distributed",
    "RendezvousTimeout": "distributed", "UnevenBatches": "distributed",
    "init_wandb": "trackers", "guarded": "trackers", "Tracker": "trackers",
    "TrackerTimeout": "trackers",
    "setup_environment": "environment", "progress_bar": "environment",
    "StepRunner": "runner", "TrainingFailed": "runner",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'hangkit.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hangkit.training.{module}"), name)
