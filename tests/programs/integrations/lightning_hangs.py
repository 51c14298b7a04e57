"""A plain PyTorch Lightning script whose only hangkit line is the callback: it trains a tiny
classifier on CPU, printing nothing, and at global step HANG_AT its training_step blocks
forever, still printing nothing.

Run it the way a user would:

    hangkit watch --progress-timeout auto -- python lightning_hangs.py

Output silence alone would take `--timeout` to notice; the callback's beats stop at step
HANG_AT in phase "train", and `--progress-timeout auto` (5 x the step interval, at least 30 s,
once 5 steps were timed) calls that a hang.
"""

import threading
import time

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from hangkit.integrations.lightning import HangkitCallback

# Steps as slow as a small real model's: auto needs 5 step intervals timed before it judges,
# and beats go once a second, so HANG_AT x STEP_SECONDS (9 s) is over 5 beats' worth.
STEP_SECONDS = 0.25
HANG_AT = 36


class TinyClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        if self.global_step == HANG_AT:
            # The hang under test: this step never returns, and nothing is printed.
            threading.Event().wait()
        time.sleep(STEP_SECONDS)  # ok-sleep: stands in for a step's compute
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=10 * HANG_AT, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[HangkitCallback()])
    trainer.fit(TinyClassifier(), DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main()
