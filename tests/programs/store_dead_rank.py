"""Rank 1 is killed (SIGKILL, as by the OOM killer) at step 3; the others wait for it in a
store-based barrier (as torch's _store_based_barrier does), which never notices a dead peer."""

import os
import signal
import time
from datetime import timedelta

from torch.distributed import TCPStore

import hangkit

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                 is_master=rank == 0, timeout=timedelta(seconds=120))
for step in range(100):
    hangkit.progress(step=step, phase="train")
    time.sleep(0.3)  # ok-sleep: stands in for the step's work; long enough for beats to go out
    if step == 3 and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    hangkit.progress(phase="barrier")
    store.set(f"arrived-{step}-{rank}", "1")
    store.wait([f"arrived-{step}-{r}" for r in range(world)])
