"""Datasets for tests/test_training_dataloader.py: importable by spawned workers too."""

from __future__ import annotations

import os
import signal
import threading

import torch

BLOCK_FOREVER = threading.Event()  # never set


class Squares:
    def __init__(self, n=64):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, i * i])


class BlocksAt(Squares):
    """DL-01: __getitem__ never returns for one index."""

    def __init__(self, n, stuck):
        super().__init__(n)
        self.stuck = stuck

    def __getitem__(self, i):
        if i == self.stuck:
            BLOCK_FOREVER.wait()  # the blocking line
        return super().__getitem__(i)


class KilledAt(Squares):
    """DL-02: the worker fetching one index is killed (as by the OOM killer)."""

    def __init__(self, n, fatal):
        super().__init__(n)
        self.fatal = fatal
        self.parent = os.getpid()

    def __getitem__(self, i):
        if i == self.fatal and os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


# DL-04: a lock a background thread holds. In this process the holder lets go when asked; in a
# forked child the holder thread does not exist, so the lock stays held forever.
LOCK = threading.Lock()
WANTED = threading.Event()
HELD = threading.Event()


def hold_lock(timeout=60.0):
    """Starts the holder thread and returns once it holds LOCK."""

    def holder():
        with LOCK:
            HELD.set()
            WANTED.wait(timeout)

    t = threading.Thread(target=holder, name="lock-holder", daemon=True)
    t.start()
    HELD.wait(10)
    return t


class NeedsLock(Squares):
    def __getitem__(self, i):
        WANTED.set()
        with LOCK:
            pass
        return super().__getitem__(i)
