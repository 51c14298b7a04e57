"""Which collective, if any, a thread is waiting in: the one table of what waiting in a
collective looks like, for torch.distributed (c10d, functional collectives and DTensor, FSDP 1
and 2, DDP), the frameworks on top of it (Lightning, Accelerate, the HF Trainer and DeepSpeed
all end in c10d's functions, which name the op) and MPI (mpi4py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hangkit.monitor.stacks import (
    bare_name,
    innermost_python_frame,
    innermost_user_frame,
    source_line,
)
from hangkit.records import Frame, ThreadStack

# torch.distributed.distributed_c10d's collectives: the outermost of them names the op
# (all_gather_object calls all_gather; FSDP2 calls all_gather_single, reduce_scatter_single).
TORCH_COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_coalesced", "broadcast", "barrier", "monitored_barrier",
    "all_gather", "all_gather_single", "all_gather_into_tensor", "_all_gather_base",
    "all_gather_coalesced", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter",
    "send", "recv", "all_gather_object", "broadcast_object_list", "gather_object",
    "scatter_object_list", "send_object_list", "recv_object_list", "batch_isend_irecv",
    "_coalescing_manager",
})
_C10D_FILE = "torch/distributed/distributed_c10d.py"
# Waits in a collective that happen outside those functions, by (file, function) in the
# stack, outermost match first; the op as the Flight Recorder names it, and whose it is.
WAIT_SITES: dict[tuple[str, str], tuple[str, str]] = {
    # Functional collectives (what DTensor's redistribute and compiled code issue): the
    # wait is for the tensor, issued earlier.
    ("torch/distributed/_functional_collectives.py", "wait_tensor"):
        ("collective", "a functional collective (DTensor, torch.compile)"),
    # FSDP2 issues its all-gather async and waits for it at unshard.
    ("torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py", "wait_for_unshard"):
        ("all_gather", "FSDP's parameter all-gather"),
    ("torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py", "foreach_all_gather"):
        ("all_gather", "FSDP's parameter all-gather"),
    ("torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py", "foreach_reduce"):
        ("reduce_scatter", "FSDP's gradient reduce-scatter"),
    ("torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py", "_wait_for_post_backward"):
        ("reduce_scatter", "FSDP's gradient reduce-scatter"),
    # FSDP 1.
    ("torch/distributed/fsdp/_runtime_utils.py", "_unshard"):
        ("all_gather", "FSDP's parameter all-gather"),
    ("torch/distributed/fsdp/_runtime_utils.py", "_wait_for_computation_stream"):
        ("all_gather", "FSDP's parameter all-gather"),
    ("torch/distributed/fsdp/_runtime_utils.py", "_reduce_grad"):
        ("reduce_scatter", "FSDP's gradient reduce-scatter"),
    # DDP's buffers, broadcast before each forward (C++ under this Python frame).
    ("torch/nn/parallel/distributed.py", "_distributed_broadcast_coalesced"):
        ("broadcast", "DDP's buffer broadcast"),
}
# A blocked backward pass: the autograd engine runs DDP's and FSDP's gradient hooks, which
# issue their collectives from C++ and wait for them before backward() returns.
BACKWARD = ("torch/autograd/graph.py", "_engine_run_backward")
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
    purpose: str | None = None  # whose collective it is, where not the user's own call


def collective_of(thread: ThreadStack | None, *, blocked: bool = False) -> Collective | None:
    """The collective the thread waits in, or None. `blocked`: the process is blocked (not
    on a CPU), which is what tells a backward pass waiting for its gradients' all-reduce from
    one computing."""
    if thread is None:
        return None
    site = innermost_user_frame(thread)
    for f in thread.frames:
        if f.native:
            continue
        if f.file.endswith(_C10D_FILE) and f.function in TORCH_COLLECTIVES:
            return Collective(f.function.lstrip("_"), "torch", site)
        known = _wait_site(f)
        if known is not None:
            return Collective(known[0], "torch", site, known[1])
    if blocked and any(not f.native and f.file.endswith(BACKWARD[0])
                       and bare_name(f) == BACKWARD[1] for f in thread.frames):
        return Collective("all_reduce", "torch", site,
                          "the gradient reduction of DDP or FSDP inside backward()")
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


def _wait_site(f: Frame) -> tuple[str, str] | None:
    for (file, function), known in WAIT_SITES.items():
        if f.file.endswith(file) and bare_name(f) == function:
            return known
    return None
