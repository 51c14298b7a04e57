"""MP-02 with MPI and nothing of hangkit's in the program: rank 1 never reaches the Barrier
rank 0 waits in. Each rank prints a heartbeat until the hang exists, then writes a readiness
record of its own (its pid and the job's directories, as the rank sees them) and goes silent.

Stdlib and mpi4py only: what watch's death must not leave running is a user's plain job."""

import json
import os
import sys
import threading

_stop = threading.Event()


def _beat():
    while not _stop.wait(0.2):
        os.write(1, b".\n")


threading.Thread(target=_beat, daemon=True).start()

from mpi4py import MPI  # noqa: E402

comm = MPI.COMM_WORLD
comm.Barrier()  # everyone is up: MPICH's shared memory segment is mapped by every rank
_stop.set()
record = {"pid": os.getpid(), "rank": comm.rank, "argv": sys.argv,
          "env": {k: os.environ.get(k) for k in ("TMPDIR", "HANGKIT_INJECT",
                                                  "TORCH_NCCL_DEBUG_INFO_PIPE_FILE")}}
directory = os.environ["HANGKIT_READY_DIR"]
path = os.path.join(directory, f"pid-{os.getpid()}-main.json")
with open(path + ".part", "w") as f:
    json.dump(record, f)
os.rename(path + ".part", path)  # whole or not at all
print(f"ready pid={os.getpid()}", flush=True)
if comm.rank == 1:
    threading.Event().wait()  # rank-only work that never finishes
comm.Barrier()
