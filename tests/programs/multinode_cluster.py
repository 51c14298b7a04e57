"""The notebook's EngineCluster with engines on two simulated nodes (tests/test_multinode.py),
driven as a notebook's cells would: start 4 engines (2 a node, from PBS_NODEFILE), run code
on them, then a hang: rank 3 (on the second node) waits for good while ranks 0-2 wait in an
MPI Barrier; its stacks, the interrupt's escalation, and close().

Prints one JSON object: the engines' hosts, what each engine's code saw, the merged tree's
groups and the diagnosis, the interrupt's lines. Usage: multinode_cluster.py BIND_ADDRESS
"""

import json
import sys
import time

from hangkit.jupyter import EngineCluster
from hangkit.jupyter.livestacks import innermost

HANG = """
import threading
from mpi4py import MPI
if MPI.COMM_WORLD.rank == 3:
    threading.Event().wait()
MPI.COMM_WORLD.Barrier()
"""

with EngineCluster(4, bind=sys.argv[1], start_timeout=180) as cluster:
    out = {"engines": {r: i["host"] for r, i in cluster.engines.items()}}
    cluster.execute("import socket\nhost = socket.gethostname()").wait(120)
    out["pulled"] = cluster.pull("host")
    out["nodes"] = sorted(n.host for n in cluster.monitor.nodes())
    cluster.execute(HANG)
    deadline = time.monotonic() + 120
    while True:  # until the hang exists: ranks start their cells at their own pace
        tree, diagnoses = cluster.stacks()
        if any(d.kind == "MP-02" for d in diagnoses) or time.monotonic() > deadline:
            break
    out["where"] = innermost(tree)
    out["diagnosis"] = [d.to_json() for d in diagnoses]
    out["interrupt"] = cluster.interrupt(grace=5)
print(json.dumps(out))
