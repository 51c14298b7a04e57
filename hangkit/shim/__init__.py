"""The rank shim and the node relay: what runs on every compute node beside the ranks.

    mpiexec -n 8 --ppn 4 hangkit rank -- python train.py

`hangkit rank` (rank.py) is each rank's parent. It gives the rank its GPU (CUDA_VISIBLE_DEVICES
from the local rank) and starts it; being its ancestor, it can read it and its DataLoader
workers with py-spy and /proc even where ptrace is limited to ancestors, send it the
faulthandler signal when its main thread holds the GIL, signal and end its whole tree, and
report its exit (code or signal) the moment it dies. It waits in one poll: no busy thread,
nothing on the rank's hot path.

The first shim on a node (a lock file decides) also starts the node's relay (relay.py), a
process of its own: the node's ranks send their beats to it over a local socket under a short
path, and it sends the monitor one batch per interval, so the monitor handles one message per
node per second instead of one per rank. It answers the monitor's requests for its node
(stacks, Flight Recorder dumps, samples, a whole capture, signals, ending the node's
processes) by asking the node's agents and shims at once, and replies once.

Messages on the node are signed with the job's key, as every hangkit message is
(hangkit.transport).
"""

from __future__ import annotations

import hashlib
import os
import socket

RELAY_VARIABLE = "HANGKIT_RELAY"  # the node relay's endpoint, in each rank's environment
SHIM_MARKER = "HANGKIT_SHIM_ID"  # every process of one rank's tree carries its shim's id
# The node-local directory of the relay's socket and lock. Not TMPDIR: that may be on a shared
# filesystem, and would be one socket for every node; and the path must stay far below the
# AF_UNIX limit of 107 bytes (DL-06).
RUNTIME_DIRECTORY = "/tmp"
# In a TMPDIR a shim made (the job script made it on the first node only): the node's relay
# removes such a TMPDIR when it ends, after every rank of the node.
MADE_MARK = ".made-by-hangkit-rank"


def is_helper(cmdline: list[str]) -> bool:
    """Whether a command line is a shim (`hangkit rank ...`, `python -m hangkit rank ...`) or a
    relay: launchers of the job, never a rank, though they carry the rank's variables."""
    words = [os.path.basename(w) for w in cmdline[:4]]
    for i, word in enumerate(words[:-1]):
        if word == "hangkit.shim.relay":
            return True
        if word == "hangkit" and words[i + 1] == "rank":
            return True
    return False


def relay_paths(key: str, host: str | None = None) -> tuple[str, str]:
    """(the relay's zmq endpoint, its lock file) for one job (its monitor key) on this node.
    The host is in the name too, for nodes that share one /tmp."""
    host = host or socket.gethostname()
    tag = hashlib.sha256(f"{key}\0{host}".encode()).hexdigest()[:16]
    base = os.path.join(RUNTIME_DIRECTORY, f"hk-{tag}")
    return f"ipc://{base}.relay", f"{base}.lock"
