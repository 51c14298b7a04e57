"""A plain transformers Trainer script whose only hangkit line is the callback: it trains a
tiny BERT built from a config (nothing is downloaded) on an in-memory dataset, on CPU,
printing nothing, and at global step HANG_AT its training step blocks forever, still printing
nothing.

Run it the way a user would:

    hangkit watch --progress-timeout auto -- python hf_trainer_hangs.py OUT_DIR

Output silence alone would take `--timeout` to notice; the callback's beats stop at step
HANG_AT in phase "train", and `--progress-timeout auto` (5 x the step interval, at least 30 s,
once 5 steps were timed) calls that a hang.
"""

import os
import sys
import threading
import time

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hangkit.integrations.transformers import HangkitCallback

# Steps as slow as a small real model's: auto needs 5 step intervals timed before it judges,
# and beats go once a second, so HANG_AT x STEP_SECONDS (9 s) is over 5 beats' worth.
STEP_SECONDS = 0.25
HANG_AT = 36
SEQ = 12
VOCAB = 64


class ToyParity(Dataset):
    """Token sequences labelled by whether token 7 occurs in them."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class SlowTrainer(Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == HANG_AT:
            # The hang under test: this step never returns, and nothing is printed.
            threading.Event().wait()
        time.sleep(STEP_SECONDS)  # ok-sleep: stands in for a step's compute
        return super().training_step(model, inputs, num_items_in_batch)


def main():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=SEQ, num_labels=2)
    args = TrainingArguments(output_dir=os.path.join(sys.argv[1], "hf_trainer_out"),
                             use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             max_steps=10 * HANG_AT, logging_steps=1000, save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = SlowTrainer(model=BertForSequenceClassification(config), args=args,
                          train_dataset=ToyParity(64), callbacks=[HangkitCallback()])
    trainer.train()


if __name__ == "__main__":
    main()
