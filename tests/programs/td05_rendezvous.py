"""TD-05: world size 2, one rank launched: init_process_group waits for the missing rank."""

from hangprog import heartbeat, ready

heartbeat()

import os  # noqa: E402
import socket  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch.distributed as dist  # noqa: E402

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
ready()
dist.init_process_group("gloo", rank=0, world_size=2, timeout=timedelta(seconds=120))
