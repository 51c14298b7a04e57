"""A blocking open() of a file that never becomes readable, as on a hung shared filesystem."""

import os

from hangprog import ready, scratch


def load_shard(path):
    with open(path, "rb") as f:
        return f.read()


path = scratch("shard-0007.bin")
os.mkfifo(path)
ready()
load_shard(path)
