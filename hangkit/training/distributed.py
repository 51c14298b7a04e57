"""Distributed building blocks with deadlines: init, barriers, error isolation, batch counts.

Each turns a silent 30-minute hang into an error that names ranks (hang cases TD-01, TD-04,
TD-05, TD-06, MP-01 in the hang-case catalogue):

- init_distributed(): env:// rendezvous done by hand. Rank 0 hosts a TCPStore on
  MASTER_ADDR:MASTER_PORT; every rank connects (a plain socket first, so "nothing listens
  there" is told apart from "the store is slow") and sets `hangkit/joined/<rank>`; all wait,
  against one deadline, until every rank's key is there. A timeout says which ranks joined
  and which did not (TD-05); then the process group is built on that store.
- barrier(): a store barrier. It works for every backend (NCCL's barrier cannot say who is
  missing, and gloo's monitored_barrier names them on rank 0 only), and on a timeout every
  waiting rank names the ranks that did not arrive (TD-01). mpi_barrier() does the same for
  an mpi4py communicator with non-blocking calls.
- ErrorFlag: at each step boundary a tiny all_reduce of per-rank failure flags, so an
  exception on one rank reaches the others as PeerFailed within one step (TD-04).
- check_even_batches(): every rank's batch count, compared before the epoch (TD-06).
- install_mpi_excepthook(): an unhandled exception aborts the MPI job instead of leaving the
  other ranks in their next collective and this one in MPI_Finalize (MP-01).

torch and mpi4py are imported where used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import traceback
import warnings
from datetime import timedelta

from hangkit.errors import HangkitError, UsageError
from hangkit.launcher import (  # noqa: F401 - the port range is part of this API
    DERIVED_PORT_BASE,
    DERIVED_PORT_SPAN,
    derived_port,
    job_nodes,
    wait_for_listener,
)
from hangkit.rankenv import rank_from_environ, world_size_from_environ
from hangkit.text import first_line, last_line, ranks_phrase

log = logging.getLogger(__name__)

__all__ = [
    "BarrierTimeout", "CollectiveTimeout", "DistributedError", "ErrorFlag", "PeerFailed",
    "RendezvousError", "RendezvousTimeout", "UnevenBatches", "barrier", "check_even_batches",
    "get_store", "init_distributed", "install_mpi_excepthook", "mpi_barrier",
]

TD05_HINT = ("every rank must reach the store at MASTER_ADDR:MASTER_PORT, and WORLD_SIZE must "
             "equal the ranks launched; run `hangkit doctor --only torch_distributed` in the job")
TD01_HINT = ("a rank skipped this barrier or is stuck before it (rank-0-only eval or "
             "checkpoint?): look at the missing ranks' stacks")
TD04_HINT = "fix the failing rank's exception; the other ranks stopped at the step boundary"
TD06_HINT = ("give every rank the same number of batches: DistributedSampler(drop_last=True), "
             "DataLoader(drop_last=True), or DDP's join() context manager")

_state: dict = {}
NO_MESSAGE = "(no message)"


# -- errors ------------------------------------------------------------------------------

class DistributedError(HangkitError, RuntimeError):
    """A distributed step failed; `rank` is this process's rank."""

    def __init__(self, message: str, *, hint: str | None = None, rank: int | None = None):
        super().__init__(message, hint=hint)
        self.rank = rank


class RendezvousError(DistributedError):
    """init_distributed could not form the group. `joined`/`missing`: ranks, as last seen."""

    def __init__(self, message: str, *, hint: str | None = TD05_HINT, rank=None,
                 world_size=None, master_addr=None, master_port=None, joined=(), missing=()):
        super().__init__(message, hint=hint, rank=rank)
        self.world_size, self.master_addr, self.master_port = world_size, master_addr, master_port
        self.joined, self.missing = list(joined), list(missing)


class RendezvousTimeout(RendezvousError, TimeoutError):
    """The rendezvous did not complete within its deadline."""


class BarrierTimeout(DistributedError, TimeoutError):
    """A barrier did not complete. `missing`: the ranks that did not arrive (None if unknown)."""

    def __init__(self, message: str, *, rank=None, missing=None, arrived=(), timeout=None,
                 hint: str | None = TD01_HINT):
        super().__init__(message, hint=hint, rank=rank)
        self.missing = None if missing is None else list(missing)
        self.arrived, self.timeout = list(arrived), timeout


class CollectiveTimeout(DistributedError, TimeoutError):
    """A hangkit collective (error flag, batch counts) did not complete within its deadline."""


class PeerFailed(DistributedError):
    """Other ranks failed. `failed`: {rank: traceback text}, as one error (CompositeError)."""

    def __init__(self, failed: dict[int, str], *, rank: int | None = None, step=None):
        self.failed = dict(sorted(failed.items()))
        self.step = step
        lines = [f"rank {r}: {_headline(tb)}" for r, tb in self.failed.items()]
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"{ranks_phrase(self.failed)} failed{at}: " + "; ".join(lines),
                         hint=TD04_HINT, rank=rank)

    def render_tracebacks(self) -> str:
        return "\n".join(f"[rank {r}]\n{tb.rstrip()}" for r, tb in self.failed.items())


class UnevenBatches(HangkitError, ValueError):
    """Ranks have different batch counts. `counts`: {rank: batches}."""

    def __init__(self, counts: dict[int, int]):
        self.counts = dict(counts)
        super().__init__(_uneven_message(self.counts), hint=TD06_HINT)


def _headline(text: str) -> str:
    """ErrorFlag's texts start with a summary line; a bare traceback ends with one."""
    return last_line(text, NO_MESSAGE) if text.lstrip().startswith("Traceback") \
        else first_line(text, NO_MESSAGE)


def _summary(error: BaseException) -> str:
    """One line for the other ranks. An exception a DataLoader worker raised comes back as
    "Caught X in DataLoader worker process N." with the worker's own message last."""
    text = str(error)
    line = f"{type(error).__name__}: {first_line(text, NO_MESSAGE)}"
    if "Original Traceback" in text:
        line += f" {last_line(text, NO_MESSAGE)}"
    return line


def _uneven_message(counts: dict[int, int]) -> str:
    by_count: dict[int, list[int]] = {}
    for r, n in sorted(counts.items()):
        by_count.setdefault(n, []).append(r)
    parts = [f"{ranks_phrase(rs)}: {n} batches" for n, rs in sorted(by_count.items())]
    return ("uneven batch counts (the ranks with more would hang in the gradient all-reduce "
            "after the others finish): " + "; ".join(parts))


# -- init ---------------------------------------------------------------------------------

def _plan(master_addr, master_port, rank, world_size, environ) -> tuple[str, int, int, int]:
    if rank is None:
        rank = rank_from_environ(environ)
    if world_size is None:
        world_size = world_size_from_environ(environ)
    if rank is None or world_size is None:
        raise UsageError("no rank or world size: pass rank= and world_size=, or launch with "
                         "mpiexec/torchrun (PMI_RANK, PALS_RANKID, RANK and their sizes)",
                         hint="set RANK and WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not below the world size {world_size}")
    if master_addr is None:
        nodes = job_nodes(environ)
        # MASTER_ADDR when given; else the job's first host, where mpiexec --hostfile
        # $PBS_NODEFILE puts rank 0; else this host, for a single-node run.
        master_addr = environ.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1")
    if master_port is None:
        value = environ.get("MASTER_PORT", "").strip()
        if value:
            if not value.isdigit():
                raise UsageError(f"MASTER_PORT={value!r} is not a port number")
            master_port = int(value)
        elif environ.get("PBS_JOBID"):
            master_port = derived_port(environ["PBS_JOBID"])
        else:
            raise UsageError("MASTER_PORT is not set and there is no PBS_JOBID to derive one "
                             "from", hint="export MASTER_PORT (the same free port on every rank)")
    return master_addr, int(master_port), int(rank), int(world_size)


def _joined(store, world_size: int) -> list[int]:
    return [r for r in range(world_size) if store.check([f"hangkit/joined/{r}"])]


def init_distributed(backend: str = "gloo", *, timeout: float = 120.0,
                     collective_timeout: float = 1800.0, master_addr: str | None = None,
                     master_port: int | None = None, rank: int | None = None,
                     world_size: int | None = None, environ=None):
    """Initialises torch.distributed's default group; returns (rank, world_size).

    `timeout` bounds the rendezvous (all ranks present at the store); `collective_timeout` is
    the process group's own timeout: for its connection step, once all ranks are known to be
    there, and for later collectives. Raises RendezvousTimeout naming the ranks that
    joined and those that did not, or RendezvousError when the store cannot be reached or
    opened.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        raise UsageError("torch.distributed is already initialised in this process",
                         hint="call init_distributed once, before any init_process_group")
    environ = os.environ if environ is None else environ
    addr, port, rank, size = _plan(master_addr, master_port, rank, world_size, environ)
    where = f"{addr}:{port}"
    context = dict(rank=rank, world_size=size, master_addr=addr, master_port=port)
    started = time.monotonic()
    deadline = started + timeout
    if rank == 0:
        try:
            store = dist.TCPStore(addr, port, None, True, timedelta(seconds=timeout),
                                  wait_for_workers=False)
        except Exception as e:
            raise RendezvousError(f"rank 0 could not open the store on {where}: {e}",
                                  hint="is the port held by an earlier run, or MASTER_ADDR not "
                                  "this host?", **context) from e
    else:
        try:
            wait_for_listener(addr, port, deadline)
            store = dist.TCPStore(addr, port, None, False,
                                  timedelta(seconds=max(deadline - time.monotonic(), 1.0)))
        except Exception as e:
            raise RendezvousTimeout(
                f"rank {rank} could not reach the store at {where} within {timeout:g} s "
                f"({e}): rank 0 has not opened it there, or this host cannot reach "
                f"{addr}", **context) from e
    store.set(f"hangkit/joined/{rank}", socket.gethostname())
    joined: list[int] = [rank]
    delay = 0.005
    keys = [f"hangkit/joined/{r}" for r in range(size)]
    try:
        while not store.check(keys):
            if time.monotonic() >= deadline:
                joined = _joined(store, size)
                missing = sorted(set(range(size)) - set(joined))
                raise RendezvousTimeout(
                    f"{ranks_phrase(joined)} joined; {ranks_phrase(missing)} did not within "
                    f"{timeout:g} s (store at {where}, world size {size})",
                    joined=joined, missing=missing, **context)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    except RendezvousTimeout:
        raise
    except Exception as e:
        raise RendezvousError(f"lost the store at {where} while waiting for the other ranks "
                              f"(rank 0 ended?): {e}", **context) from e
    store.set_timeout(timedelta(seconds=collective_timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=timedelta(seconds=collective_timeout))
    _state.update(store=store, rank=rank, world_size=size, generations={})
    log.debug("rendezvous of %d ranks at %s took %.2f s", size, where,
              time.monotonic() - started)
    return rank, size


def get_store():
    """The store init_distributed built (None before it ran)."""
    return _state.get("store")


# -- barriers -----------------------------------------------------------------------------

def barrier(*, timeout: float = 300.0, group=None) -> None:
    """Waits until every rank of `group` (default: all) arrives, or raises BarrierTimeout
    naming the ranks that did not, on every rank that waited. Goes through the store of
    init_distributed, so it works the same for gloo and NCCL."""
    import torch.distributed as dist

    store = _state.get("store")
    if store is None:
        raise UsageError("barrier() needs the store of init_distributed()",
                         hint="call hangkit's init_distributed instead of init_process_group")
    ranks = list(range(dist.get_world_size())) if group is None else \
        dist.get_process_group_ranks(group)
    me = dist.get_rank()
    if me not in ranks:
        raise UsageError(f"rank {me} is not a member of the group given to barrier()")
    name = "default" if group is None else str(getattr(group, "group_name", id(group)))
    generations = _state["generations"]
    gen = generations[name] = generations.get(name, 0) + 1
    key = f"hangkit/barrier/{name}/{{gen}}/{{rank}}"
    _store_call(lambda: store.set(key.format(gen=gen, rank=me), "1"), me, gen)
    keys = [key.format(gen=gen, rank=r) for r in ranks]
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not _store_call(lambda: store.check(keys), me, gen):
        if time.monotonic() >= deadline:
            arrived = [r for r in ranks if store.check([key.format(gen=gen, rank=r)])]
            missing = [r for r in ranks if r not in arrived]
            raise BarrierTimeout(
                f"barrier #{gen} timed out after {timeout:g} s on rank {me}: "
                f"{ranks_phrase(missing)} did not arrive ({ranks_phrase(arrived)} did)",
                rank=me, missing=missing, arrived=arrived, timeout=timeout)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    # Every rank has set its key of this barrier, so all have left the previous one.
    with contextlib.suppress(Exception):
        store.delete_key(key.format(gen=gen - 1, rank=me))


def _store_call(call, me: int, gen: int):
    try:
        return call()
    except Exception as e:  # DistNetworkError: the store's host, rank 0, has gone
        raise DistributedError(f"barrier #{gen} on rank {me}: the store is gone "
                               f"({first_line(str(e) or repr(e), NO_MESSAGE)})",
                               hint="rank 0 hosts the store: it has exited; look at its output",
                               rank=me) from e


_MPI_BARRIER_TAG = 7400


def mpi_barrier(comm, *, timeout: float = 300.0) -> None:
    """A barrier on an mpi4py communicator that gives up after `timeout` seconds.

    Every rank sends an arrival note to rank 0, rank 0 sends one to every rank, and an
    Ibarrier completes the barrier; all are polled against the deadline. On a timeout, rank 0
    names the ranks whose notes did not come; the others say whether rank 0 arrived. 2(N-1)
    tiny messages, so it scales to large jobs. After a timeout the Ibarrier stays pending:
    treat the communicator as broken and end the job (raise, or comm.Abort).
    """
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    gen = _state["mpi_gen"] = _state.get("mpi_gen", 0) + 1
    tag = _MPI_BARRIER_TAG + gen % 1000
    note = bytearray(1)
    sends, recvs, sources = [], [], []
    if rank == 0:
        for r in range(1, size):
            sends.append(comm.Isend([note, MPI.BYTE], dest=r, tag=tag))
            recvs.append(comm.Irecv([bytearray(1), MPI.BYTE], source=r, tag=tag))
            sources.append(r)
    elif size > 1:
        sends.append(comm.Isend([note, MPI.BYTE], dest=0, tag=tag))
        recvs.append(comm.Irecv([bytearray(1), MPI.BYTE], source=0, tag=tag))
        sources.append(0)
    ibarrier = comm.Ibarrier()
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while not ibarrier.Test():
        if time.monotonic() >= deadline:
            arrived = {0, rank} | {s for s, req in zip(sources, recvs) if req.Test()}
            for req in recvs:
                if not req.Test():
                    with contextlib.suppress(Exception):
                        req.Cancel()
            if rank == 0:
                missing = sorted(set(range(size)) - arrived)
                what = (f"{ranks_phrase(missing)} did not arrive"
                        if missing else "every rank arrived at rank 0 but the barrier did "
                        "not complete")
            else:
                missing = None if 0 in {s for s, r in zip(sources, recvs) if r.Test()} else [0]
                what = ("rank 0 arrived; its error names the missing ranks"
                        if missing is None else "rank 0 did not arrive")
            raise BarrierTimeout(f"MPI barrier #{gen} timed out after {timeout:g} s on rank "
                                 f"{rank}: {what}", rank=rank, missing=missing,
                                 arrived=sorted(arrived), timeout=timeout)
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    # The barrier completed, so every note was sent: these complete at once.
    MPI.Request.Waitall(recvs + sends)


# -- error isolation ----------------------------------------------------------------------

class ErrorFlag:
    """Tells every rank, at each step boundary, whether any rank failed (TD-04)::

        flag = ErrorFlag()
        for step, batch in enumerate(loader):
            with flag.guard(step):
                train_step(batch)

    On the failing rank the guard re-raises its own exception after telling the others; the
    others raise PeerFailed naming it. Costs one all_reduce of world_size ints per step.
    """

    def __init__(self, *, group=None, timeout: float = 300.0):
        self.group, self.timeout = group, timeout
        self.checks = 0
        # Ranks create their flags in the same order, so this names one flag on all ranks.
        self.id = _state["flags"] = _state.get("flags", 0) + 1

    @contextlib.contextmanager
    def guard(self, step=None):
        try:
            yield
        except Exception as e:
            self.check(e, step=step)
            raise
        self.check(None, step=step)

    def check(self, error: BaseException | str | None = None, *, step=None) -> None:
        """Raises PeerFailed if any other rank reports a failure at this boundary.
        `error`: this rank's exception (or message), None if it did well."""
        import torch
        import torch.distributed as dist

        self.checks += 1
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        me = dist.get_rank()
        text = None
        if error is not None:
            # The first line is the summary the others print; the traceback follows.
            text = error if isinstance(error, str) else (
                f"{_summary(error)}\n" + "".join(
                    traceback.format_exception(type(error), error, error.__traceback__)))
        store = _state.get("store")
        if text is not None and store is not None:
            # Set before the all_reduce, so it is there when the others read it.
            store.set(f"hangkit/failed/{self.id}/{self.checks}/{me}", text)
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        flags = torch.zeros(size, dtype=torch.int32, device=device)
        flags[rank] = 1 if text is not None else 0
        _wait(dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
              self.timeout, f"error-flag check #{self.checks} (step boundary)", me)
        failed_local = [i for i, v in enumerate(flags.tolist()) if v]
        if not failed_local:
            return
        failed_global = [dist.get_global_rank(self.group, i) if self.group is not None else i
                         for i in failed_local]
        if store is not None:
            prefix = f"hangkit/failed/{self.id}/{self.checks}"
            texts = {r: store.get(f"{prefix}/{r}").decode(errors="replace")
                     for r in failed_global}
        else:
            gathered: list = [None] * size
            dist.all_gather_object(gathered, text, group=self.group)
            texts = {g: gathered[i] or "(no message)" for i, g in zip(failed_local,
                                                                       failed_global)}
        if text is not None:
            return  # this rank re-raises its own exception
        raise PeerFailed(texts, rank=me, step=step)


def _wait(work, timeout: float, what: str, rank: int) -> None:
    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except Exception as e:
        reason = last_line(str(e), NO_MESSAGE)
        if "timed out" not in reason.lower() and "timeout" not in reason.lower():
            raise DistributedError(f"{what} failed on rank {rank}: {reason}",
                                   hint="another rank has exited: look at its output",
                                   rank=rank) from e
        raise CollectiveTimeout(f"{what} did not complete on rank {rank} within {timeout:g} s: "
                                f"{reason}",
                                hint="a rank is stuck inside its step or has died: look at its "
                                "stack", rank=rank) from e


def check_even_batches(n_batches: int, *, timeout: float = 300.0, group=None,
                       action: str = "raise") -> dict[int, int]:
    """Compares every rank's batch count before the epoch; returns {rank: count}. Uneven
    counts raise UnevenBatches (action="raise") or warn (action="warn"), naming the ranks."""
    import torch
    import torch.distributed as dist

    if action not in ("raise", "warn"):
        raise UsageError(f"action={action!r}: use 'raise' or 'warn'")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    counts = torch.zeros(size, dtype=torch.int64, device=device)
    counts[rank] = int(n_batches)
    _wait(dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group, async_op=True), timeout,
          "batch-count check", dist.get_rank())
    by_rank = {(dist.get_global_rank(group, i) if group is not None else i): int(n)
               for i, n in enumerate(counts.tolist())}
    if len(set(by_rank.values())) > 1:
        if action == "raise":
            raise UnevenBatches(by_rank)
        warnings.warn(_uneven_message(by_rank) + f" ({TD06_HINT})", RuntimeWarning, stacklevel=2)
    return by_rank


# -- MPI ----------------------------------------------------------------------------------

def install_mpi_excepthook() -> None:
    """An unhandled exception prints its traceback and calls MPI_Abort, ending the whole job
    (MP-01: otherwise this rank waits in MPI_Finalize and the others in their next
    collective). Does nothing extra where MPI is not initialised. Idempotent."""
    if getattr(sys.excepthook, "_hangkit_mpi", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        MPI = sys.modules.get("mpi4py.MPI")
        if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized():
            previous(kind, value, tb)
            return
        comm = MPI.COMM_WORLD
        sys.stderr.write(f"hangkit: unhandled exception on MPI rank {comm.Get_rank()} of "
                         f"{comm.Get_size()}; aborting the job (MPI_Abort)\n")
        previous(kind, value, tb)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        comm.Abort(1)

    hook._hangkit_mpi = True
    sys.excepthook = hook
