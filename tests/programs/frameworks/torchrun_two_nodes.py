"""Small DDP training script for a two-node job, launched on one node only.

Launch (node 0 of 2, 2 ranks per node, c10d rendezvous hosted on this node; gloo on CPU):

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank 0 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29591 torchrun_two_nodes.py

The hang: the second node (the same command with `--node-rank 1`) is never launched, so
torchrun's elastic agent waits in the rendezvous for a node that never joins. No rank process
is started at all: the only process is the torchrun agent (Python), which hosts the rendezvous
TCPStore on the endpoint and polls the rendezvous state once a second. After the launch banner
(the OMP_NUM_THREADS warning) it prints nothing. The script below never runs.

Where the agent waits (innermost frames first):
  _delay (torch/distributed/elastic/rendezvous/utils.py) -> time.sleep(1)
  _DistributedRendezvousOpExecutor.run (rendezvous/dynamic_rendezvous.py)
  DynamicRendezvousHandler.next_rendezvous (rendezvous/dynamic_rendezvous.py)
  SimpleElasticAgent._rendezvous (agent/server/api.py)
  SimpleElasticAgent._initialize_workers (agent/server/api.py)
  SimpleElasticAgent._invoke_run (agent/server/api.py)
  SimpleElasticAgent.run -> launch_agent (launcher/api.py) -> elastic_launch.__call__
  -> run / main (torch/distributed/run.py) -> <module> (torchrun)

(The agent's main thread is named `pt_elastic` in /proc/PID/comm; its other threads are
`torchrun` and the TCPStore server's `pt_tcpstore_uv`. The agent has no child processes.)

How long: the rendezvous join timeout, 600 s by default (the c10d handler's `join_timeout`),
after which the agent raises RendezvousTimeoutError (from _DistributedRendezvousOpExecutor.run)
with a traceback and torchrun exits with status 1. `--rdzv-conf join_timeout=30` shortens it:
torchrun then gave up 30 s after the banner (34 s after launch), status 1.
"""

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 5
BATCH = 16


def main():
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(1234 + rank)
    for step in range(STEPS):
        xb = torch.randn(BATCH, 32, generator=g)
        yb = (xb.sum(dim=1, keepdim=True) > 0).float()
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        print(f"[rank {rank}] step {step}: loss {loss.item():.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
