"""A scatter (whose root alone has inputs), then an all_reduce whose sizes differ across ranks
(rank 1 sends 6 floats, the others 4), then
each rank's Flight Recorder as hangkit's agent reads it ($HANGKIT_READY_DIR/agent/RANK.json)
and as torch dumps it itself ($HANGKIT_READY_DIR/torch/nccl_trace_rank_RANK, the name
TORCH_FR_DUMP_TEMP_FILE gives). gloo fails such a collective by itself (on some ranks); each
rank prints what it saw. Run under mpiexec with TORCH_FR_BUFFER_SIZE set.
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
    # A scatter's root has inputs the other ranks have not: different sizes by design.
    dist.scatter(torch.zeros(4), [torch.ones(4)] * world if rank == 0 else None, src=0)
    try:
        dist.all_reduce(torch.ones(6 if rank == 1 else 4))
        outcome = "completed"
    except RuntimeError as e:
        outcome = str(e).splitlines()[0]
    os.write(1, f"rank {rank}: {outcome}\n".encode())
    out = os.environ["HANGKIT_READY_DIR"]
    for where in ("agent", "torch"):
        os.makedirs(os.path.join(out, where), exist_ok=True)
    write_atomic(os.path.join(out, "agent", f"{rank}.json"), json.dumps(recording()))
    write_atomic(os.path.join(out, "torch", f"nccl_trace_rank_{rank}"),
                 torch._C._distributed_c10d._dump_fr_trace())
    # No destroy_process_group(): after an aborted collective its barrier could wait for good.
    os._exit(0)


main()
