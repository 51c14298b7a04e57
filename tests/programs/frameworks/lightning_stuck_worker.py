"""PyTorch Lightning DDP job in which one rank's DataLoader worker gets stuck reading a sample.

Launch (Lightning's own launcher: this process becomes rank 0 and re-runs the script for rank 1;
gloo on CPU; MASTER_PORT is optional; the stalled "file" is a named pipe created under the
directory given as the first argument, default the current one):

    python lightning_stuck_worker.py [DATA_DIR]

The hang: the training set's `__getitem__` reads one sample (index STALL_INDEX) on rank 1 from
storage that never answers, as a read from a hung network filesystem would: it opens the named
pipe `DATA_DIR/stalled_sample.fifo`, which nobody writes, and open() blocks. The read happens in
rank 1's DataLoader worker process (num_workers=1, forked), so the worker is the first process
to stop. Rank 1's main process then waits for that batch from the worker, and rank 0 goes on to
the next batch and waits in its next collective, which rank 1 never reaches. Nothing errors
until the process-group timeout (300 s, set on the DDP strategy); the worker would wait in
open() forever, and the DataLoader's own timeout is 0 (wait forever).

In order: both ranks run batches 0-3; at the start of batch 4 both pass Lightning's
"received SIGTERM?" broadcast, then rank 1 asks its DataLoader for batch 4 (the loader has a
length, so Lightning does not fetch ahead) and the worker blocks on index 56. Rank 0 gets its
batch 4, runs training_step (it prints "batch 4") and waits in the backward.

Where each process waits:
  rank 0:           `trainer.fit(...)` in main() -> _AutomaticOptimization.run -> SGD.step ->
                    closure -> Strategy.backward -> loss.backward() -> DDP reducer's bucket
                    all_reduce (Reducer::finalize_backward; Flight Recorder: gloo:all_reduce)
  rank 1:           `trainer.fit(...)` in main() -> _TrainingEpochLoop.advance ->
                    next(data_fetcher) -> _MultiProcessingDataLoaderIter._next_data ->
                    _get_data -> _try_get_data -> multiprocessing Queue.get(timeout=5), polled
                    again and again (no collective)
  rank 1's worker:  `with open(path, "rb") as f:` in SampleStore.read_from_storage, called from
                    SampleStore.__getitem__ -> torch's _MapDatasetFetcher.fetch -> _worker_loop
                    (open(2) of the FIFO, outside torch)
  rank 0's worker:  idle in _worker_loop, waiting for the next indices (Queue.get)

Note: Lightning installs a SIGTERM handler in every rank, and a rank blocked in a collective
does not act on it: stopping the hung job takes SIGKILL. Killing rank 1 alone leaves its
DataLoader worker blocked in open(): kill it by its own PID. Lightning (2.6) starts rank 1 in
rank 0's session and process group, so `timeout -s KILL` on the launch (which signals its
process group) ends rank 0, rank 1 and both workers. The FIFO stays behind in DATA_DIR.
Where mpi4py is installed, Lightning's MPIEnvironment.detect() imports it, so every rank
initializes MPI: a rank killed with SIGKILL leaves /dev/shm/mpich_shm_<pid in hex>_0 behind
(MPICH).
"""

import os
import sys
from datetime import timedelta

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

SAMPLES = 2 * 8 * 8  # 2 ranks x 8 batches x 8 samples
BATCH = 8
# Lightning puts a shuffled DistributedSampler (seed PL_GLOBAL_SEED = 0) on the training loader:
# in epoch 0, index 56 is the first sample of rank 1's batch 4 (rank 0 never reads it).
STALL_INDEX = 56


class SampleStore(Dataset):
    """Samples kept in memory, except one that has to be read back from storage on rank 1."""

    def __init__(self, rank, data_dir):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, 32, generator=g)
        self.y = torch.randint(0, 4, (SAMPLES,), generator=g)
        self.rank = rank
        self.data_dir = data_dir

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        if self.rank == 1 and i == STALL_INDEX:
            return self.read_from_storage(i)
        return self.x[i], self.y[i]

    def read_from_storage(self, i):
        path = os.path.join(self.data_dir, "stalled_sample.fifo")
        if not os.path.exists(path):
            os.mkfifo(path)
        with open(path, "rb") as f:
            x = torch.frombuffer(bytearray(f.read(32 * 4)), dtype=torch.float32)
        return x, self.y[i]


class TinyClassifier(pl.LightningModule):
    def __init__(self, data_dir):
        super().__init__()
        self.data_dir = data_dir
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        self.loss_fn = nn.CrossEntropyLoss()

    def train_dataloader(self):
        dataset = SampleStore(self.global_rank, self.data_dir)
        return DataLoader(dataset, batch_size=BATCH, num_workers=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        print(f"[rank {self.global_rank}] batch {batch_idx}: loss {loss.item():.4f}", flush=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main():
    data_dir = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=300)),
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(TinyClassifier(data_dir))


if __name__ == "__main__":
    main()
