"""One torch gloo all_reduce across the simulated nodes, ranks from hydra (PMI_RANK, PMI_SIZE)
and the rendezvous from MASTER_ADDR and MASTER_PORT. Prints "rank host address sum": the address
its hostname resolves to (which gloo binds), and the sum of rank+1 over the ranks."""

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
# Generous: importing torch on a loaded machine can take longer than some ranks wait.
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
# One write per line (print writes its end apart when unbuffered): ranks share the
# stdout that mpiexec forwards.
host = socket.gethostname()
sys.stdout.write(f"{rank} {host} {socket.gethostbyname(host)} {int(value.item())}\n")
sys.stdout.flush()
dist.destroy_process_group()
