"""imports: torch, mpi4py, ipyparallel and wandb (the last two where installed), each imported in
a child of its own with a deadline, with its import time and version.

Guards against the hang before the first line of training: `import torch` reading thousands of
small files from a conda environment on a shared filesystem (Lustre/GPFS home or project space
that hundreds of ranks read at once) takes minutes or never returns; an import that crashes (an
ABI or libmpi mismatch) kills every rank at start-up. Each import runs in a child so a hang is
contained and killed at the deadline; all children start at once, so the probe takes as long as
the slowest import, not the sum. mpi4py is imported with mpi4py.rc.initialize = False: the import
is what is tested here, MPI_Init is the mpi probe's job.

HANGKIT_DOCTOR_IMPORTS: comma-separated further modules to import the same way (your own package,
a data library): each must import, like torch. HANGKIT_DOCTOR_SLOW_IMPORT: seconds above which
an import counts as slow (default 10).
"""

from __future__ import annotations

import importlib.util
import re
from concurrent.futures import ThreadPoolExecutor

from hangkit.probes.api import (
    ChildResult,
    Outcome,
    ProbeContext,
    fail,
    ok,
    run_python,
    timed_out,
    warn,
    worst,
)

REQUIRED = ("torch",)  # training cannot run without them: a failed import is a failure
OPTIONAL = ("mpi4py", "ipyparallel", "wandb")  # wanted where used: missing or broken warns
SLOW_SECONDS = 10.0
MARKER = "HANGKIT-IMPORT "
MARGIN = 1.0  # seconds kept back from the probe's deadline to kill a child and report
_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

# The child: imports one module, times the import alone (not the interpreter's start), and
# leaves with os._exit so a module's exit handlers cannot make a finished import look hung.
CHILD = r"""
import json, os, sys, time
name = sys.argv[1]
started = time.perf_counter()
extra = {}
if name == "mpi4py":
    import mpi4py
    mpi4py.rc.initialize = False  # the import, not MPI_Init
    mpi4py.rc.finalize = False
    from mpi4py import MPI
    module = mpi4py
    try:
        extra["mpi_library"] = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    except Exception:
        pass
else:
    import importlib
    module = importlib.import_module(name)
seconds = time.perf_counter() - started
version = getattr(module, "__version__", None)
if version is None:
    try:
        from importlib.metadata import version as dist_version
        version = dist_version(name.split(".")[0])
    except Exception:
        pass
print("\n" + __MARKER__ + json.dumps({"seconds": seconds, "version": None if version is None
                                      else str(version), **extra}), flush=True)
os._exit(0)
""".replace("__MARKER__", repr(MARKER))

SLOW_ADVICE = ("Imports this slow mean Python is reading its packages from a shared filesystem: "
               "put the environment on local disk (copy or unpack the conda environment to "
               "/local/scratch or /dev/shm on each node at job start and activate it from there), "
               "or use a container image; a thousand ranks importing from Lustre at once is much "
               "slower still.")
TIMEOUT_ADVICE = ("The import never finished: find where it waits with `py-spy dump --pid PID` "
                  "while `python -c 'import {name}'` hangs, or run it under `hangkit watch`. "
                  "A shared filesystem that stalls (copy the environment to /local/scratch or "
                  "/dev/shm) and a module that starts work at import are the usual causes.")
TORCH_MISSING_ADVICE = ("Install torch into this environment, or activate the one that has it "
                        "(on Polaris: `module load conda; conda activate`) before training.")
MPI4PY_ADVICE = ("Install mpi4py built against the system MPI: on Polaris `module load conda` "
                 "provides it, or build it yourself with `MPICC=\"cc -shared\" pip install "
                 "--no-binary=mpi4py --no-cache-dir mpi4py`. Do not install the PyPI mpich wheel "
                 "(pip install mpich, or hangkit's local-mpi extra) on Polaris: it shadows "
                 "Cray MPICH and cannot use the Slingshot network.")


def run(ctx: ProbeContext) -> Outcome:
    extra, bad = _extra_modules(ctx.environ.get("HANGKIT_DOCTOR_IMPORTS", ""))
    if bad:
        return fail(f"HANGKIT_DOCTOR_IMPORTS names {', '.join(map(repr, bad))}, not module names",
                    "Set HANGKIT_DOCTOR_IMPORTS to comma-separated module names, e.g. "
                    "HANGKIT_DOCTOR_IMPORTS=numpy,mypackage.data")
    try:
        slow = float(ctx.environ.get("HANGKIT_DOCTOR_SLOW_IMPORT") or SLOW_SECONDS)
    except ValueError:
        slow = SLOW_SECONDS
    missing = [m for m in (*REQUIRED, *OPTIONAL) if importlib.util.find_spec(m) is None]
    names = [m for m in (*REQUIRED, *OPTIONAL, *extra) if m not in missing]
    names = list(dict.fromkeys(names))
    budget = ctx.remaining(MARGIN)
    with ThreadPoolExecutor(max_workers=max(len(names), 1)) as pool:
        children = list(pool.map(lambda n: run_python(CHILD, timeout=budget, env=ctx.environ,
                                                      args=[n]), names))
    modules, outcomes = {}, []
    for name, child in zip(names, children):
        modules[name], outcome = _judge(name, child, budget, slow, required=name not in OPTIONAL)
        if outcome is not None:
            outcomes.append(outcome)
    for name in missing:
        modules[name] = {"status": "missing"}
        if name in REQUIRED:
            outcomes.append(fail(f"{name} is not installed", TORCH_MISSING_ADVICE))
        elif name == "mpi4py":
            outcomes.append(warn("mpi4py is not installed", MPI4PY_ADVICE))
    summary = ", ".join(_summary(n, m) for n, m in modules.items() if m["status"] != "missing")
    absent = [n for n in missing if n not in REQUIRED and n != "mpi4py"]
    if absent:
        summary += f"; not installed: {', '.join(absent)}"
    data = {"modules": modules, "slow_seconds": slow}
    if not outcomes:
        return ok(summary, **data)
    status = worst(outcomes)
    details = "; ".join(o.detail for o in outcomes)
    advice = " ".join(dict.fromkeys(o.advice for o in outcomes if o.advice))
    return Outcome(status, f"{details} (all: {summary})", advice, data)


def _extra_modules(text: str) -> tuple[list[str], list[str]]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    return [n for n in names if _NAME.match(n)], [n for n in names if not _NAME.match(n)]


def _judge(name: str, child: ChildResult, budget: float, slow: float,
           required: bool) -> tuple[dict, Outcome | None]:
    """The module's record, and an Outcome when something is wrong with it."""
    if child.timed_out:
        record = {"status": "timeout", "seconds": round(child.seconds, 3)}
        return record, timed_out(f"import {name} did not finish within {budget:.1f} s",
                                 TIMEOUT_ADVICE.format(name=name))
    found = child.report(MARKER) if child.returncode == 0 else None
    if found is None:
        how = (f"killed by signal {-child.returncode}" if child.returncode < 0
               else f"exit code {child.returncode}")
        error = child.last_line() or how
        record = {"status": "fail", "error": error, "returncode": child.returncode}
        detail = f"import {name} failed: {error}"
        if name == "mpi4py":
            return record, warn(detail, MPI4PY_ADVICE)
        if not required:
            return record, warn(detail, f"Reinstall {name} in this environment, or do not "
                                "import it in training.")
        return record, fail(detail, f"Fix the environment so that `python -c 'import {name}'` "
                            "works on a compute node: the error above is its last line.")
    record = {"status": "ok", "seconds": round(found["seconds"], 3),
              "version": found.get("version")}
    if "mpi_library" in found:
        record["mpi_library"] = found["mpi_library"]
    if found["seconds"] > slow:
        record["status"] = "slow"
        return record, warn(f"import {name} took {found['seconds']:.1f} s (over {slow:g} s)",
                            SLOW_ADVICE)
    return record, None


def _summary(name: str, m: dict) -> str:
    if m["status"] in ("ok", "slow"):
        library = f" ({m['mpi_library'][:40]})" if m.get("mpi_library") else ""
        return f"{name} {m.get('version') or '?'}{library} {m['seconds']:.1f} s"
    return f"{name} {m['status'].upper()}"
