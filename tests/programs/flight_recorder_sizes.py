"""An all_reduce whose sizes differ across ranks (rank 1 sends 6 floats, the others 4), then
each rank's Flight Recorder as hangkit's agent reads it (recording-RANK.json) and as torch
dumps it itself (nccl_trace_rank_RANK, the name TORCH_FR_DUMP_TEMP_FILE gives), both in
$HANGKIT_READY_DIR. gloo aborts such a collective by itself; each rank prints what it raised.
Run under mpiexec with TORCH_FR_BUFFER_SIZE set.
"""

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from hangkit.agent.recorder import recording
from hangkit.files import write_atomic


def main():
    rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    dist.all_reduce(torch.ones(4))
    try:
        dist.all_reduce(torch.ones(6 if rank == 1 else 4))
        outcome = "completed"
    except RuntimeError as e:
        outcome = str(e).splitlines()[0]
    print(f"rank {rank}: {outcome}", flush=True)
    out = os.environ["HANGKIT_READY_DIR"]
    write_atomic(os.path.join(out, f"recording-{rank}.json"), json.dumps(recording()))
    write_atomic(os.path.join(out, f"nccl_trace_rank_{rank}"),
                 torch._C._distributed_c10d._dump_fr_trace())
    # No destroy_process_group(): after an aborted collective its barrier could wait for good.
    os._exit(0)


main()
