"""A rank whose recorder is asked of torch's NCCL watchdog through its debug pipe.

NCCL cannot run here (no GPU), so this program does what ProcessGroupNCCL's watchdog does with
TORCH_NCCL_DEBUG_INFO_PIPE_FILE (DumpPipe in torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp):
it unlinks and makes the FIFO STEM + rank + ".pipe" (mode 0666), opens it read-only and
non-blocking, reads it about once a second from a thread of its own, and on a byte writes its
recorder, pickled, to TORCH_FR_DUMP_TEMP_FILE + rank. The recorder is real: a one-rank gloo
group's after a few all_reduces, its entries named as NCCL names them. Then the main thread
waits forever, outside any agent's reach (the test runs it with --no-inject).
Usage: nccl_watchdog_rank.py (rank from RANK)"""

import os
import pickle
import threading
from datetime import timedelta

import torch
import torch.distributed as dist


def recorder_as_nccl() -> dict:
    dump = pickle.loads(torch._C._distributed_c10d._dump_fr_trace(True, True, False))
    for e in dump["entries"]:
        e["profiling_name"] = e["profiling_name"].replace("gloo:", "nccl:")
    return dump


def watchdog(pipe: str, out: str) -> None:
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    while True:
        try:
            asked = os.read(fd, 128)
        except BlockingIOError:
            asked = b""
        if asked:
            with open(out, "wb") as f:
                f.write(pickle.dumps(recorder_as_nccl()))
        threading.Event().wait(1.0)  # the watchdog's own pace


def main():
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    for _ in range(3):
        dist.all_reduce(torch.ones(4))
    pipe = f"{os.environ['TORCH_NCCL_DEBUG_INFO_PIPE_FILE']}{rank}.pipe"
    if os.path.exists(pipe):
        os.unlink(pipe)
    os.mkfifo(pipe, 0o666)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    prefix = os.environ.get("TORCH_FR_DUMP_TEMP_FILE") or \
        os.path.join(cache, "torch", "comm_lib_trace_rank_")  # torch 2.7+'s default
    out = f"{prefix}{rank}"
    threading.Thread(target=watchdog, args=(pipe, out), daemon=True).start()
    print(f"ready: {pipe}", flush=True)
    threading.Event().wait()


main()
