"""A rank of a plain program, on any Python 3 (no torch, no hangkit): says where it is, then
waits for a peer that never comes. Usage: plain_rank.py (rank from PMI_RANK or RANK)."""

import json
import os
import sys
import threading


def wait_for_peer():
    threading.Event().wait()


rank = os.environ.get("PMI_RANK", os.environ.get("RANK"))
print(json.dumps({"rank": rank, "pid": os.getpid(), "python": sys.version.split()[0]}),
      flush=True)
wait_for_peer()
