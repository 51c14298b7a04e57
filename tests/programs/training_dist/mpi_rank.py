"""One rank of an mpiexec job. Usage: mpi_rank.py MODE OUTDIR

barrier_skip: the last rank skips hangkit's mpi_barrier; every rank writes OUTDIR/rank-<r>.json,
then rank 0, once all are written, ends the job with MPI_Abort(0) (the barrier the skipping
rank left pending cannot be finalised cleanly).
excepthook: rank 1 raises with install_mpi_excepthook() installed while rank 0 waits in a
blocking Barrier, which without the hook would never end (MP-01); no_excepthook: the same
without the hook (the hang itself).
barrier_ok: three of hangkit's mpi_barrier on all ranks; each writes OUTDIR/rank-<r>.json.
"""

import json
import sys
import time
from pathlib import Path

from mpi4py import MPI

from hangkit.training import distributed as hd

mode, out = sys.argv[1], Path(sys.argv[2])
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

if mode in ("excepthook", "no_excepthook"):
    if mode == "excepthook":
        hd.install_mpi_excepthook()
    (out / f"ready-{rank}").write_text("1")
    if rank == 1:
        raise ValueError("boom on MPI rank 1")
    comm.Barrier()
    sys.exit(0)

result = {"rank": rank}
started = time.monotonic()
if mode == "barrier_ok":
    for _ in range(3):
        hd.mpi_barrier(comm, timeout=20)
    result["seconds"] = round(time.monotonic() - started, 3)
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    sys.exit(0)
if rank == size - 1:
    result["skipped"] = True
else:
    try:
        hd.mpi_barrier(comm, timeout=3)
    except hd.BarrierTimeout as e:
        result.update(error_type=type(e).__name__, message=str(e), missing=e.missing)
result["seconds"] = round(time.monotonic() - started, 3)
(out / f"rank-{rank}.json.tmp").write_text(json.dumps(result))
(out / f"rank-{rank}.json.tmp").rename(out / f"rank-{rank}.json")
if rank == 0:
    deadline = time.monotonic() + 20
    while len(list(out.glob("rank-*.json"))) < size and time.monotonic() < deadline:
        time.sleep(0.02)  # ok-sleep: polls for the others' results, with a deadline
    comm.Abort(0)
# The others wait for rank 0's abort (bounded: hydra ends them with it).
time.sleep(30)  # ok-sleep: waits to be ended by rank 0's MPI_Abort, bounded
