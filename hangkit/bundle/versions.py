"""versions.json: the software a hang involves (Python, the platform, hangkit, torch with its
CUDA and NCCL, the MPI library), found without hanging: torch and mpi4py are imported only in
child processes killed at their deadline (importing torch from a stalled shared filesystem
never returns)."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Mapping
from typing import Any

from hangkit.deadline import DeadlineExceeded

REAP_SECONDS = 10.0  # beyond a child's deadline: run_python kills its session and reaps it
PACKAGES = ("hangkit", "torch", "mpi4py", "ipyparallel", "ipywidgets", "pyzmq", "psutil",
            "py-spy")
MARKER = "HANGKIT-REPORT-CHILD "

# The children: print one JSON line after MARKER and leave with os._exit, so a module's exit
# handlers cannot make a finished child look hung.
TORCH_CHILD = r"""
import json, os, time
started = time.perf_counter()
try:
    import torch
except ModuleNotFoundError as e:
    info = {"status": "not installed", "error": str(e)}
else:
    info = {"status": "ok", "version": torch.__version__,
            "import_seconds": round(time.perf_counter() - started, 3),
            "cuda": getattr(torch.version, "cuda", None),
            "hip": getattr(torch.version, "hip", None), "nccl": None}
    try:
        v = torch.cuda.nccl.version()  # the library's version: no device, no CUDA init
        info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        pass  # a CPU build has no NCCL
    try:
        import torch.distributed as dist
        info["distributed_backends"] = [n for n in ("gloo", "nccl", "mpi", "ucc")
                                        if getattr(dist, "is_%s_available" % n, lambda: False)()]
    except Exception:
        pass
print("\n" + __MARKER__ + json.dumps(info), flush=True)
os._exit(0)
""".replace("__MARKER__", repr(MARKER))

MPI_CHILD = r"""
import json, os
try:
    import mpi4py
except ModuleNotFoundError as e:
    info = {"status": "not installed", "error": str(e)}
else:
    mpi4py.rc.initialize = False  # the library's version needs no MPI_Init
    mpi4py.rc.finalize = False
    from mpi4py import MPI
    info = {"status": "ok", "mpi4py": mpi4py.__version__,
            "library_version": MPI.Get_library_version().strip(),
            "standard": "%d.%d" % MPI.Get_version()}
print("\n" + __MARKER__ + json.dumps(info), flush=True)
os._exit(0)
""".replace("__MARKER__", repr(MARKER))


def _package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    if found["hangkit"] is None:  # a source checkout on sys.path, not installed
        from hangkit import __version__

        found["hangkit"] = __version__
    return found


def _child(code: str, timeout: float, environ: Mapping[str, str]) -> dict:
    from hangkit.probes.api import run_python

    child = run_python(code, timeout=timeout, env=dict(environ))
    found = child.report(MARKER)
    if found is not None:
        found["seconds"] = round(child.seconds, 3)
        return found
    if child.timed_out:
        return {"status": "timeout", "error": f"did not finish within {timeout:g} s (a stalled "
                "filesystem under the environment?); `hangkit doctor --only imports` says more"}
    return {"status": "failed", "error": child.last_line() or child.ended_how()}


def error_text(error: BaseException) -> str:
    """An error as the bundle words it (here and in collect()): an OSError by its strerror and
    file; a missed deadline as "did not finish within N s", without the task's name, which
    would mean nothing to the reader of README.txt."""
    if isinstance(error, DeadlineExceeded):
        return f"did not finish within {error.seconds:g} s"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error) or type(error).__name__


def version_tasks(timeout: float, environ: Mapping[str, str]
                  ) -> dict[str, tuple[Callable[[], Any], float]]:
    """What versions_json() needs, as deadline.call_all tasks, so collect() runs them at once
    with its file reads: each child is given up on `REAP_SECONDS` after its own deadline."""
    return {
        "torch": (lambda: _child(TORCH_CHILD, timeout, environ), timeout + REAP_SECONDS),
        "mpi": (lambda: _child(MPI_CHILD, timeout, environ), timeout + REAP_SECONDS),
        "packages": (_package_versions, timeout),
    }


def versions_json(got: Mapping[str, Any]) -> dict:
    """versions.json from the results of version_tasks() (a value, or the exception)."""
    packages = got["packages"]
    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    if isinstance(packages, Exception):
        versions["packages_error"] = error_text(packages)
        packages = {}
    versions.update({name: packages.get(name) for name in PACKAGES})
    for key in ("torch", "mpi"):
        found = got[key]
        versions[f"{key}_details"] = ({"status": "failed", "error": error_text(found)}
                                      if isinstance(found, Exception) else found)
    mpi = versions["mpi_details"]
    versions["mpi_library"] = (mpi["library_version"].splitlines()[0]
                               if mpi.get("library_version") else None)
    torch = versions["torch_details"]
    versions["torch_cuda"], versions["torch_nccl"] = torch.get("cuda"), torch.get("nccl")
    return versions
