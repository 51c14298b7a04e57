"""hangkit.instrument(): count collectives per rank, torch.distributed's and mpi4py's.

Each wrapped call takes the next sequence number of its library and communicator and marks the
rank as inside it until it returns, so the monitor can say "rank 2 is in broadcast #41; ranks 0,
1, 3 are in all_reduce #41". A wrapper costs about a microsecond, next to a collective's tens of
microseconds at the very least: cheap enough to leave on.

Limits, said plainly: only calls made through the patched names are seen (torch's module
functions, and MPI.COMM_WORLD or a communicator passed in or derived from it); collectives that
DDP issues from C++ are not; with async_op=True the rank is "inside" only while the call itself
runs, not while it waits on the returned work.
"""

from __future__ import annotations

import functools
import sys
import time

from hangkit.agent import beacon

TORCH_OPS = (
    "all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather",
    "scatter", "all_gather_object", "broadcast_object_list", "gather_object",
    "scatter_object_list", "monitored_barrier",
)
MPI_OPS = (
    "Barrier", "barrier", "Allreduce", "allreduce", "Bcast", "bcast", "Reduce", "reduce",
    "Allgather", "allgather", "Allgatherv", "Gather", "gather", "Gatherv", "Scatter", "scatter",
    "Scatterv", "Alltoall", "alltoall", "Alltoallv", "Reduce_scatter", "Reduce_scatter_block",
    "Scan", "Exscan",
)
_WRAPPED = "__hangkit_wrapped__"


def counted(library: str, comm: str, op: str, call, *args, **kwargs):
    s = beacon.state
    current = s.collective
    if current is not None and current[4] is not None:
        return call(*args, **kwargs)  # nested (all_gather_object calls all_gather): one count
    key = (library, comm)
    seq = s.sequences.get(key, 0) + 1
    s.sequences[key] = seq
    entered = time.monotonic()
    s.collective = (library, comm, op, seq, entered)
    try:
        return call(*args, **kwargs)
    finally:
        s.collective_seconds += time.monotonic() - entered
        s.collective = (library, comm, op, seq, None)


def instrument(*comms, torch: bool = True, mpi: bool = True):
    """Counts collectives from now on. Returns the mpi4py communicators given, wrapped.

    torch.distributed is patched when torch is installed. mpi4py is patched only if it is
    already imported (importing it would initialise MPI): MPI.COMM_WORLD is replaced by a
    counting communicator, so call this right after `from mpi4py import MPI`.
    """
    beacon.progress()  # starts the agent if the environment names a monitor
    if torch:
        _instrument_torch()
    wrapped = []
    if mpi and ("mpi4py.MPI" in sys.modules or comms):
        wrapped = _instrument_mpi(comms)
    if not comms:
        return None
    return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)


def _instrument_torch() -> None:
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d
    except ImportError:
        return
    labels: dict[int, str] = {}

    def comm_label(group) -> str:
        if group is None or group is dist.GroupMember.WORLD:
            return "world"
        label = labels.get(id(group))
        if label is None:
            try:
                label = "ranks " + ",".join(map(str, dist.get_process_group_ranks(group)))
            except Exception:
                label = f"group {id(group):x}"
            labels[id(group)] = label
        return label

    for op in TORCH_OPS:
        original = getattr(c10d, op, None)
        if original is None or getattr(original, _WRAPPED, False):
            continue
        wrapper = _torch_wrapper(op, original, comm_label)
        setattr(c10d, op, wrapper)
        if getattr(dist, op, None) is original:
            setattr(dist, op, wrapper)


def _torch_wrapper(op: str, original, comm_label):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return counted("torch", comm_label(kwargs.get("group")), op, original, *args, **kwargs)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


_mpi_class = None


def _instrument_mpi(comms) -> list:
    from mpi4py import MPI

    cls = _counting_comm_class(MPI)
    if not isinstance(MPI.COMM_WORLD, cls):
        world = cls(MPI.COMM_WORLD)
        world.hangkit_label = "world"
        MPI.COMM_WORLD = world
    out = []
    for comm in comms:
        if isinstance(comm, cls):
            out.append(comm)
            continue
        wrapped = cls(comm)
        if comm == MPI.COMM_WORLD:
            wrapped.hangkit_label = "world"
        out.append(wrapped)
    return out


def _counting_comm_class(MPI):
    """A subclass of Intracomm whose collectives count; mpi4py keeps the subclass on Dup and
    Split, so derived communicators count too."""
    global _mpi_class
    if _mpi_class is not None:
        return _mpi_class

    def make(op):
        original = getattr(MPI.Intracomm, op)

        def method(self, *args, **kwargs):
            label = getattr(self, "hangkit_label", None)
            if label is None:
                label = self.hangkit_label = self.Get_name() or "comm"
            return counted("mpi", label, op, original, self, *args, **kwargs)

        method.__name__ = op
        return method

    namespace = {op: make(op) for op in MPI_OPS if hasattr(MPI.Intracomm, op)}
    _mpi_class = type("CountingIntracomm", (MPI.Intracomm,), namespace)
    return _mpi_class
