"""Which collective, if any, a thread is waiting in: torch.distributed or MPI (mpi4py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hangkit.monitor.stacks import innermost_python_frame, innermost_user_frame, source_line
from hangkit.records import Frame, ThreadStack

TORCH_COLLECTIVES = frozenset({
    "all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce",
    "gather", "scatter", "send", "recv", "monitored_barrier", "all_gather_object",
    "broadcast_object_list", "gather_object", "scatter_object_list", "batch_isend_irecv",
})
_C10D_FILE = "torch/distributed/distributed_c10d.py"
MPI_OPS = frozenset({
    "Barrier", "barrier", "Allreduce", "allreduce", "Reduce", "reduce", "Bcast", "bcast",
    "Allgather", "allgather", "Allgatherv", "Gather", "gather", "Gatherv", "Scatter", "scatter",
    "Scatterv", "Alltoall", "alltoall", "Alltoallv", "Reduce_scatter", "Reduce_scatter_block",
    "Recv", "recv", "Send", "send", "Sendrecv", "sendrecv", "Wait", "wait", "Waitall", "Probe",
    "probe", "Ibarrier", "Scan", "Exscan",
})
_CALL = re.compile(r"\.(\w+)\s*\(")


@dataclass(frozen=True)
class Collective:
    op: str
    family: str  # "torch" or "mpi"
    call_site: Frame | None  # the user's line that made the call


def collective_of(thread: ThreadStack | None) -> Collective | None:
    if thread is None:
        return None
    site = innermost_user_frame(thread)
    # torch: the outermost c10d function names the op (all_gather_object calls all_gather).
    for f in thread.frames:
        if not f.native and f.file.endswith(_C10D_FILE) and f.function in TORCH_COLLECTIVES:
            return Collective(f.function, "torch", site)
    # mpi4py: a native frame from mpi4py's extension, or MPI's own PMPI_ symbol.
    for f in thread.frames:
        if f.native and "mpi4py" in f.file and f.function.split(".")[-1] in MPI_OPS:
            return Collective(f.function.split(".")[-1], "mpi", site)
    for f in thread.frames:
        if f.native and f.function.startswith(("PMPI_", "MPI_")):
            return Collective(f.function.split("_", 1)[1], "mpi", site)
    # No native frames: read the call on the innermost Python line, when that line is the user's.
    # Only calls on an object that looks like a process group or communicator count, so that
    # sock.recv() is not taken for MPI's recv.
    inner = innermost_python_frame(thread)
    if inner is not None and inner == site and not any(f.native for f in thread.frames):
        text = source_line(inner)
        for name in _CALL.findall(text):
            if name in TORCH_COLLECTIVES and "dist" in text:
                return Collective(name, "torch", site)
            if name in MPI_OPS and ("comm" in text.lower() or "MPI" in text):
                return Collective(name, "mpi", site)
    return None
