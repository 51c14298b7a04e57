"""A plain single-process training script (no hangkit) that starts the helpers a real job
has, then waits forever: DataLoader workers (spawned: they re-run the interpreter's start-up
with the rank's environment), a `python -c` helper, a helper script, and torch.compile's
compile workers (inductor's pool, warmed as a cold compile does). Prints their pids as one
JSON line once they all run."""

import json
import os
import subprocess
import sys
import threading

import torch
from torch._inductor.async_compile import AsyncCompile
from torch.utils.data import DataLoader, TensorDataset


def children_pids():
    import psutil

    return [c.pid for c in psutil.Process().children(recursive=True)]


def main():
    if sys.argv[1:] == ["child"]:
        threading.Event().wait()
    data = TensorDataset(torch.randn(64, 4))
    loader = DataLoader(data, batch_size=8, num_workers=2, persistent_workers=True,
                        multiprocessing_context="spawn")
    batches = iter(loader)
    next(batches)  # both workers are up once a batch came back
    helpers = [
        subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE),
        subprocess.Popen([sys.executable, __file__, "child"]),
    ]
    AsyncCompile.warm_pool()
    AsyncCompile.wait_pool_ready()
    print(json.dumps({"pid": os.getpid(), "children": children_pids(),
                      "helpers": [h.pid for h in helpers]}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
