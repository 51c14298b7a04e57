"""PyTorch Lightning DDP job in which a callback saves a checkpoint on rank 0 only.

Launch (Lightning's own launcher: this process becomes rank 0 and re-runs the script for ranks 1
and 2; gloo on CPU; MASTER_PORT is optional; the checkpoint goes under the directory given as the
first argument, default the current one):

    python lightning_rank0_checkpoint.py [CKPT_DIR]

The hang: `MidEpochCheckpoint.on_train_batch_end` calls `trainer.save_checkpoint(path)` under
`if trainer.is_global_zero and batch_idx == 2`. `Trainer.save_checkpoint` must be called on
every rank: it ends in `strategy.barrier("Trainer.save_checkpoint")`, so rank 0 (the odd rank)
writes the file and then waits in that barrier after batch 2, while ranks 1 and 2 go on to
batch 3. At the start of every batch Lightning (2.6) broadcasts a "received SIGTERM?" flag from
rank 0 (`_TrainingEpochLoop._broadcast_sigterm_tensor`), so ranks 1 and 2 wait in that
broadcast, before batch 3's training_step. Nothing errors until the process-group timeout
(300 s, set on the DDP strategy).

Where each rank waits:
  rank 0:         `trainer.save_checkpoint(path)` in MidEpochCheckpoint.on_train_batch_end ->
                  Trainer.save_checkpoint -> DDPStrategy.barrier -> dist.barrier
                  (Flight Recorder: gloo:barrier)
  rank 1, rank 2: `trainer.fit(...)` in main() -> _TrainingEpochLoop.advance ->
                  _broadcast_sigterm_tensor -> dist.broadcast(src=0)
                  (Flight Recorder: gloo:broadcast)

Note: Lightning installs a SIGTERM handler in every rank, and a rank blocked in a collective
does not act on it: stopping the hung job takes SIGKILL (or the 300 s timeout).
"""

import os
import sys
from datetime import timedelta

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        self.loss_fn = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        print(f"[rank {self.global_rank}] batch {batch_idx}: loss {loss.item():.4f}", flush=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class MidEpochCheckpoint(pl.Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero and batch_idx == 2:
            path = os.path.join(self.directory, f"mid-epoch-step{trainer.global_step}.ckpt")
            print(f"[rank 0] saving {path}", flush=True)
            trainer.save_checkpoint(path)


def main():
    ckpt_dir = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    x = torch.randn(3 * 8 * 16, 32)
    y = torch.randint(0, 4, (3 * 8 * 16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=3,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=300)),
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[MidEpochCheckpoint(ckpt_dir)],
    )
    trainer.fit(TinyClassifier(), loader)


if __name__ == "__main__":
    main()
