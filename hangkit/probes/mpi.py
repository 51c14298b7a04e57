"""mpi: MPI_Init, an allreduce and a barrier across the ranks, each step against the deadline.

Guards against MP-05 (MPI initialised in a process that mpiexec did not start: a notebook
kernel or a plain `python` runs as a singleton, world size 1, or hangs trying), against an
mpi4py built for another MPI than the launcher's (every rank comes up as a singleton: the PyPI
mpich wheel under Cray PALS), and against collectives that never complete (MP-02; a rank
missing from MPI_Init, a fabric that does not carry messages).

MPI calls block in C and hold the GIL (MPI_Init does), so no Python thread or signal can
interrupt them. The probe makes a hang attributable instead: before each blocking step it
prints one line on stderr ("mpi: rank 0/2: MPI_Init_thread ..."), which the doctor reports as
the probe's last words when it has to kill it; and after MPI_Init the collectives are
non-blocking (Iallreduce, Ibarrier) polled against the deadline, so the probe itself says which
one did not complete and how long it waited.
"""

from __future__ import annotations

import importlib.util
import time
from array import array

from hangkit.probes.api import Outcome, ProbeContext, fail, ok, timed_out, warn

# Set by a launcher for each rank it starts (hydra and Cray PMI: PMI_RANK; PMIx; Open MPI;
# PALS). torchrun's RANK is not one: a process with only RANK initialises MPI as a singleton.
LAUNCHER_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PALS_RANKID")
# Time each rank keeps to report after giving up on a step, before the doctor kills it.
MARGIN = 1.0

INSTALL_ADVICE = (
    "Install mpi4py built against the system's MPI: on Polaris `module load conda` provides it "
    "(or MPICC=cc pip install --no-binary=mpi4py mpi4py with cray-mpich loaded); never install "
    "the PyPI mpich wheel (the local-mpi extra) there: its ranks do not reach PALS and come up "
    "as singletons.")
SINGLETON_ADVICE = (
    "MP-05: this process was not started by mpiexec, so MPI runs it alone (world size 1; on "
    "some systems MPI_Init hangs or aborts instead). Start MPI code under the launcher "
    "(mpiexec -n N --ppn 4 python train.py in the PBS job), and from a notebook use "
    "ipyparallel's MPI engines (ipcluster start -n N --engines=mpi; then %%px) rather than "
    "importing mpi4py.MPI in the kernel.")
MISMATCH_ADVICE = (
    "mpi4py is linked to another MPI than the one whose mpiexec started these ranks, so each "
    "rank initialises alone. " + INSTALL_ADVICE + " Check with: python -c \"from mpi4py import "
    "MPI; print(MPI.Get_library_version())\" inside the job.")
COLLECTIVE_ADVICE = (
    "MP-02: the ranks passed MPI_Init but a collective did not complete on every rank. Look at "
    "the other ranks' rows: a rank that failed or timed out earlier is the one missing. If all "
    "are stuck in the same step, MPI cannot carry messages between these hosts: check the "
    "loaded MPI modules (module list), FI_* and MPICH_* variables, and run "
    "`mpiexec -n 2 --ppn 1 python -m mpi4py.bench ringtest` across two nodes.")


def launcher_rank(environ: dict[str, str]) -> dict[str, str]:
    return {v: environ[v] for v in LAUNCHER_VARIABLES if v in environ}


def wait_request(request, ctx: ProbeContext, margin: float = MARGIN) -> bool:
    """Polls a non-blocking MPI request until it completes (True) or the probe's deadline less
    `margin` passes (False). Testing drives MPI's progress; the sleeps keep a spinning rank
    from taking the core its peers need on an oversubscribed node."""
    delay = 0.0002
    while not request.Test():
        if ctx.remaining(margin) <= 0:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return True


def import_mpi():
    """mpi4py.MPI without initialising MPI at import, so that MPI_Init is a step of its own;
    mpi4py finalises at exit, after the doctor has the result (a rank that exits without
    MPI_Finalize makes hydra kill the others before they write theirs)."""
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = True
    from mpi4py import MPI

    return MPI


def run(ctx: ProbeContext) -> Outcome:
    if importlib.util.find_spec("mpi4py") is None:
        return Outcome("skipped", "mpi4py is not installed", INSTALL_ADVICE)
    launched = launcher_rank(ctx.environ)
    if ctx.rank is None and launched:
        # The doctor itself runs under mpiexec: this child inherited a rank's variables but not
        # its connection to the launcher, so MPI_Init here would fail or wait for nothing.
        return warn(f"this doctor runs inside an MPI rank ({', '.join(launched)} set) but "
                    "without --ranks: its probe process is not a rank, MPI not tested",
                    "Run `hangkit doctor --ranks N` from the job's shell (not under mpiexec): "
                    "it starts the N ranks itself.")
    steps: dict[str, float] = {}

    ctx.say("importing mpi4py.MPI (loads the MPI library)")
    try:
        MPI = import_mpi()
    except ImportError as e:
        return fail(f"mpi4py is installed but its MPI library does not load: {e}",
                    INSTALL_ADVICE)
    library = " ".join(MPI.Get_library_version().splitlines()[0].split())
    data = {"library": library, "mpi4py": _mpi4py_version(), "launcher": launched}

    ctx.say("MPI_Init_thread: waits until every rank of the job has called MPI_Init "
            "(one that never does, stuck before it or not an MPI program, keeps the others "
            "here)")
    started = time.monotonic()
    try:
        MPI.Init_thread()
    except Exception as e:  # mpi4py raises MPI.Exception with MPI's own message
        return fail(f"MPI_Init_thread failed: {e}", INSTALL_ADVICE, **data)
    steps["init"] = round(time.monotonic() - started, 4)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    levels = {getattr(MPI, f"THREAD_{n.upper()}"): n
              for n in ("single", "funneled", "serialized", "multiple")}
    data.update(world_size=size, rank=rank, seconds=steps,
                thread_level=levels.get(MPI.Query_thread(), MPI.Query_thread()))

    if ctx.rank is not None and (rank != ctx.rank or size != (ctx.world_size or size)):
        return fail(f"the launcher started this process as rank {ctx.rank} of "
                    f"{ctx.world_size}, but MPI says rank {rank} of {size} ({library})",
                    MISMATCH_ADVICE, **data)

    send, received = array("q", [rank, 1]), array("q", [0, 0])
    ctx.say("MPI_Iallreduce (sum of the ranks): waits for every rank")
    started = time.monotonic()
    request = comm.Iallreduce([send, MPI.INT64_T], [received, MPI.INT64_T], op=MPI.SUM)
    if not wait_request(request, ctx):
        return timed_out(f"allreduce did not complete within {time.monotonic() - started:.1f} s"
                         f" on rank {rank} of {size} (MPI_Init took {steps['init']:.2f} s)",
                         COLLECTIVE_ADVICE, **data)
    steps["allreduce"] = round(time.monotonic() - started, 4)
    expected = [size * (size - 1) // 2, size]
    if list(received) != expected:
        return fail(f"allreduce returned {list(received)}, expected {expected} (sum of ranks, "
                    f"count of ranks) on rank {rank} of {size}",
                    "MPI computed a wrong sum: a broken MPI build or network; rebuild mpi4py "
                    "against the system MPI and report the MPI library version above.", **data)

    ctx.say("MPI_Ibarrier: waits for every rank")
    started = time.monotonic()
    if not wait_request(comm.Ibarrier(), ctx):
        return timed_out(f"barrier did not complete within {time.monotonic() - started:.1f} s "
                         f"on rank {rank} of {size}, after a complete allreduce",
                         COLLECTIVE_ADVICE, **data)
    steps["barrier"] = round(time.monotonic() - started, 4)
    ctx.say("done; MPI_Finalize at exit")

    detail = (f"world size {size}, {library}; MPI_Init {steps['init']:.2f} s, allreduce "
              f"{steps['allreduce'] * 1e3:.1f} ms, barrier {steps['barrier'] * 1e3:.1f} ms")
    if size == 1 and not launched:
        data["singleton"] = True
        return warn(f"singleton MPI: not started by mpiexec (no {'/'.join(LAUNCHER_VARIABLES)})"
                    f", so MPI runs this process alone; {detail}",
                    SINGLETON_ADVICE, **data)
    return ok(detail, **data)


def _mpi4py_version() -> str:
    import mpi4py

    return getattr(mpi4py, "__version__", "?")
