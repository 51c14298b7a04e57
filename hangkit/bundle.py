"""`hangkit report`: what users are asked to send when a hang persists, in one .tar.gz.

The bundle holds the job's configuration (job.json), the software versions (versions.json), the
environment (environment.json), the latest doctor results (doctor.json), the latest hang report
(hang-report/), the tail of the job's output (output-tail.txt) and a README.txt saying what is
there and what was missing and why. Members sit under one directory named like the archive, so
unpacking it spills nothing into the current directory.

A bundle is made when something is already stuck, so nothing here may hang: torch and mpi4py are
imported only in child processes killed at their deadline (importing torch from a stalled shared
filesystem never returns), and every file is read in a daemon thread that is given up on at the
deadline (a read from a stalled Lustre mount blocks in the kernel, where no timeout reaches).

Secrets: every member passes through one redaction step. Variables whose names contain KEY,
TOKEN, SECRET or PASSWORD are hidden by name (hangkit.redact); free text (output lines, JSON
strings) has `NAME=value`, `NAME: value`, `--name value`, URL passwords and bearer tokens hidden
(redact_text); and the values of this environment's secret variables are then scrubbed wherever
they still appear (a key passed on a command line and echoed into the output).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hangkit.errors import HangkitError, UsageError
from hangkit.redact import REDACTED, SECRET_WORDS, is_secret_name, redact_environ, redact_text

CHILD_TIMEOUT = 20.0  # seconds for each child (torch, mpi4py) and for each file read
REAP_SECONDS = 10.0  # beyond a child's deadline: run_python kills its session and reaps it
DEFAULT_LINES = 50
TAIL_LIMIT = 4 << 20  # bytes of output read at most: tqdm bars make single "lines" this long
_BLOCK = 64 << 10
PACKAGES = ("hangkit", "torch", "mpi4py", "ipyparallel", "ipywidgets", "pyzmq", "psutil",
            "py-spy")
DOCTOR_GLOB = "hangkit-doctor*.json"
HANG_JSON, HANG_MD = "hang-report.json", "hang-report.md"
MARKER = "HANGKIT-REPORT-CHILD "
LAUNCH_VARIABLES = ("NNODES", "NRANKS", "NTOTRANKS", "NRANKS_PER_NODE", "RANKS_PER_NODE", "PPN",
                    "NDEPTH", "NTHREADS", "NCPUS", "OMP_NUM_THREADS", "WORLD_SIZE",
                    "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE")
# Where ranks per node may be read, most deliberate first: what the job script says it asked
# for, then what the launcher told a rank (when `hangkit report` runs inside one).
_PER_NODE_NAMES = ("NRANKS_PER_NODE", "RANKS_PER_NODE", "PPN", "PALS_LOCAL_SIZE",
                   "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE")
_TOTAL_NAMES = ("NTOTRANKS", "NRANKS", "PALS_SIZE", "PMI_SIZE", "WORLD_SIZE")
# hangkit's own record fields whose names contain a secret word but hold no secret
# (RankStatus.key is "rank 3"): JSON keys spared from redaction by name.
_RECORD_FIELDS = frozenset({"key"})
_MIN_SCRUB = 6  # shorter secret values are not scrubbed as literals: they would hit anything

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


# --- redaction ------------------------------------------------------------------------------

def _redact_json(value: Any) -> Any:
    """Strings redacted as text; the value of a key named like a secret hidden whole."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and k not in _RECORD_FIELDS
                    and is_secret_name(k) and isinstance(v, str) and v else _redact_json(v))
                for k, v in value.items()}
    return value


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values of this environment's secret variables, to scrub wherever they appear.
    Short values and paths are left alone: scrubbing "1" or "/home/me" would hit anything."""
    found = {v for k, v in environ.items()
             if is_secret_name(k) and len(v) >= _MIN_SCRUB and not v.startswith(("/", "~"))
             and v != REDACTED}
    return sorted(found, key=len, reverse=True)  # longest first: one may contain another


def redact_member(name: str, data: bytes | str,
                  secrets: Sequence[str] = ()) -> bytes | str:
    """One member's content with its secrets hidden; unchanged (the same bytes) if it has none.
    JSON is redacted value by value so its structure survives; anything else as text."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    redacted = None
    if name.endswith(".json"):
        try:
            document = json.loads(text)
        except ValueError:
            pass
        else:
            cleaned = _redact_json(document)
            redacted = text if cleaned == document else json.dumps(cleaned, indent=2) + "\n"
    if redacted is None:
        redacted = "".join(redact_text(line) for line in text.splitlines(keepends=True))
    for secret in secrets:
        for form in dict.fromkeys((secret, json.dumps(secret)[1:-1])):
            redacted = redacted.replace(form, REDACTED)
    if redacted == text:
        return data
    return redacted.encode("utf-8", "surrogateescape") if isinstance(data, bytes) else redacted


# --- what goes in ---------------------------------------------------------------------------

def tail_lines(path: Path, n: int, *, limit: int = TAIL_LIMIT) -> tuple[list[bytes], bool]:
    """The last n lines of a file (read from its end: job output can be gigabytes), and whether
    the limit cut them short (then the first one returned is a line's end)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        data = b""
        while pos > 0 and data.count(b"\n") <= n and len(data) < limit:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    cut = pos > 0 and data.count(b"\n") <= n
    if len(data) > limit:
        data, cut = data[-limit:], True
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line starts no new one
        lines.pop()
    return lines[-n:], cut


def _newest(paths) -> Path | None:
    dated = []
    for p in paths:
        try:
            dated.append((p.stat().st_mtime, str(p), p))
        except OSError:
            continue
    return max(dated)[2] if dated else None


def _read_doctor(given: Path | None, cwd: Path) -> tuple[Path, bytes] | None:
    path = given if given is not None else _newest(p for p in cwd.glob(DOCTOR_GLOB)
                                                   if p.is_file())
    return None if path is None else (path, path.read_bytes())


def _read_hang_report(given: Path | None, cwd: Path) -> tuple[Path, dict[str, bytes]] | None:
    if given is None:
        found = _newest([*cwd.glob(HANG_JSON), *cwd.glob("*/" + HANG_JSON),
                         *cwd.glob("*/*/" + HANG_JSON)])
        if found is None:
            return None
        given = found.parent
    elif given.is_file():  # hang-report.json itself
        given = given.parent
    files = {name: (given / name).read_bytes() for name in (HANG_JSON, HANG_MD)
             if (given / name).is_file()}
    return (given, files) if files else None


def _read_nodefile(environ: Mapping[str, str]) -> tuple[list[str], dict[str, int]]:
    """The job's hosts in PBS_NODEFILE order (as launcher.job_nodes gives them) and how many
    lines each has: PBS repeats a host once per MPI process asked for (mpiprocs)."""
    path = environ.get("PBS_NODEFILE")
    if not path:
        return [], {}
    with open(path) as f:
        hosts = [line.strip() for line in f if line.strip()]
    counts: dict[str, int] = {}
    for h in hosts:
        counts[h] = counts.get(h, 0) + 1
    return list(counts), counts


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


def _bounded(tasks: dict[str, tuple[Callable[[], Any], float]]) -> dict[str, Any]:
    """Runs every task at once, each in a daemon thread, and waits for each until its own
    deadline (seconds from now). A task's result, the exception it raised, or a TimeoutError
    for one still running then: its thread is left behind (a read blocked in the kernel on a
    stalled filesystem cannot be interrupted) and, a daemon, does not keep the process alive."""
    results: dict[str, Any] = {}

    def call(name: str, fn: Callable[[], Any]) -> None:
        try:
            results[name] = fn()
        except Exception as e:
            results[name] = e

    started = time.monotonic()
    threads = {}
    for name, (fn, _) in tasks.items():
        threads[name] = threading.Thread(target=call, args=(name, fn), daemon=True,
                                         name=f"hangkit-report-{name}")
        threads[name].start()
    for name, thread in threads.items():
        thread.join(max(started + tasks[name][1] - time.monotonic(), 0.0))
    return {name: results[name] if name in results
            else TimeoutError(f"did not finish within {seconds:g} s")
            for name, (_, seconds) in tasks.items()}


def _why(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error) or type(error).__name__


# --- the job --------------------------------------------------------------------------------

def _positive_int(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _first_positive(environ: Mapping[str, str], names) -> tuple[int | None, str | None]:
    """The first of these variables that holds a positive whole number, and its name."""
    for name in names:
        value = _positive_int(environ.get(name))
        if value is not None:
            return value, name
    return None, None


def job_config(environ: Mapping[str, str], nodes: list[str], lines_per_host: dict[str, int],
               *, cwd: str, host: str, now: float) -> dict:
    """The job as the scheduler and the job script describe it. Ranks per node come from the
    first of NRANKS_PER_NODE, RANKS_PER_NODE, PPN, PALS_LOCAL_SIZE, MPI_LOCALNRANKS,
    LOCAL_WORLD_SIZE; else from PBS_NODEFILE repeating every host alike (mpiprocs > 1); else
    from a total (NTOTRANKS, NRANKS, PALS_SIZE, PMI_SIZE, WORLD_SIZE) over the nodes."""
    per_node, per_node_from = _first_positive(environ, _PER_NODE_NAMES)
    total, total_from = _first_positive(environ, _TOTAL_NAMES)
    repeats = set(lines_per_host.values())
    if per_node is None and len(repeats) == 1 and min(repeats) > 1:
        per_node, per_node_from = min(repeats), "PBS_NODEFILE (lines per host)"
    if per_node is None and total is not None and nodes and total % len(nodes) == 0:
        per_node, per_node_from = total // len(nodes), f"{total_from} / nodes"
    if total is None and per_node is not None and nodes:
        total, total_from = per_node * len(nodes), "ranks per node x nodes"

    def picked(prefix: str) -> dict[str, str]:
        chosen = {k: environ[k] for k in sorted(environ) if k.startswith(prefix)}
        return {k: redact_text(v) for k, v in redact_environ(chosen).items()}

    return {
        "host": host, "cwd": cwd, "created_at": _iso(now),
        "in_pbs_job": "PBS_JOBID" in environ,
        "pbs_jobid": environ.get("PBS_JOBID"),
        "pbs_nodefile": environ.get("PBS_NODEFILE"),
        "nodes": nodes, "node_count": len(nodes),
        "ranks_per_node": per_node, "ranks_per_node_from": per_node_from,
        "total_ranks": total, "total_ranks_from": total_from,
        "launch_variables": {k: redact_text(environ[k]) for k in LAUNCH_VARIABLES
                             if k in environ},
        "pbs": picked("PBS_"), "pals": picked("PALS_"), "pmi": picked("PMI_"),
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


# --- the bundle -----------------------------------------------------------------------------

@dataclass
class Bundle:
    """Members (name -> content, secrets already hidden), what each holds, and what is missing.
    README.txt and the one-line summary are renderings of held and missing."""

    members: dict[str, bytes | str] = field(default_factory=dict)
    held: list[tuple[str, str, str]] = field(default_factory=list)  # (member, brief, about)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (member, why, what to do)

    def summary(self) -> str:
        held = ", ".join(f"{m} ({b})" if b else m for m, b, _ in self.held)
        missing = ", ".join(m for m, _ in self.missing) or "nothing"
        return f"holds {held}; missing: {missing}"


def collect(*, doctor_json: Path | None = None, hang_report: Path | None = None,
            log: Path | None = None, lines: int = DEFAULT_LINES,
            environ: Mapping[str, str] | None = None, cwd: Path | None = None,
            timeout: float = CHILD_TIMEOUT, now: float | None = None) -> Bundle:
    """Gathers everything. None for doctor_json or hang_report: the newest found under cwd
    (hangkit-doctor*.json in it; */hang-report.json up to two levels down). Reads and children
    all run at once, each with `timeout` seconds; what does not come in time is noted missing."""
    environ = dict(os.environ if environ is None else environ)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    now = time.time() if now is None else now
    host = socket.gethostname()
    got = _bounded({
        "torch": (lambda: _child(TORCH_CHILD, timeout, environ), timeout + REAP_SECONDS),
        "mpi": (lambda: _child(MPI_CHILD, timeout, environ), timeout + REAP_SECONDS),
        "packages": (_package_versions, timeout),
        "nodefile": (lambda: _read_nodefile(environ), timeout),
        "doctor": (lambda: _read_doctor(doctor_json, cwd), timeout),
        "hang": (lambda: _read_hang_report(hang_report, cwd), timeout),
        "log": (lambda: None if log is None else tail_lines(Path(log), lines), timeout),
    })
    b = Bundle()

    nodes, per_host = got["nodefile"] if not isinstance(got["nodefile"], Exception) else ([], {})
    job = job_config(environ, nodes, per_host, cwd=str(cwd), host=host, now=now)
    if isinstance(got["nodefile"], Exception):
        job["pbs_nodefile_error"] = _why(got["nodefile"])
    b.members["job.json"] = json.dumps(job, indent=2) + "\n"
    where = (f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}" if job["in_pbs_job"]
             else "not a PBS job")
    b.held.append(("job.json", where, "the job: its nodes (PBS_NODEFILE), ranks per node where "
                   "known, every PBS_* (and PALS_*, PMI_*) variable, host and directory"))

    b.members["versions.json"] = json.dumps(_versions(got), indent=2) + "\n"
    b.held.append(("versions.json", "", "Python, the platform, hangkit and the packages hangs "
                   "involve; torch's CUDA and NCCL, and the MPI library (each found in a child "
                   f"process given {timeout:g} s)"))

    hidden = sum(is_secret_name(k) for k in environ)
    b.members["environment.json"] = json.dumps(
        {k: redact_text(v) for k, v in sorted(redact_environ(environ).items())}, indent=2) + "\n"
    b.held.append(("environment.json", f"{len(environ)} variables, {hidden} hidden by name",
                   "every environment variable of the shell that ran `hangkit report`"))

    doctor = got["doctor"]
    if isinstance(doctor, tuple):
        b.members["doctor.json"] = doctor[1]
        b.held.append(("doctor.json", "", f"the doctor's results, from {doctor[0]}"))
    else:
        b.missing.append(("doctor.json", _missing_doctor(doctor, doctor_json, cwd)))

    hang = got["hang"]
    if isinstance(hang, tuple):
        for name, data in hang[1].items():
            b.members[f"hang-report/{name}"] = data
        b.held.append(("hang-report/", ", ".join(hang[1]), f"the hang report, from {hang[0]}"))
    else:
        if isinstance(hang, Exception):
            why = f"reading {hang_report or cwd} failed: {_why(hang)}"
        elif hang_report is not None:
            why = f"no {HANG_JSON} or {HANG_MD} in {hang_report}"
        else:
            why = f"none found under {cwd} (*/{HANG_JSON}, two levels down)"
        b.missing.append(("hang-report/", why + "; give its directory with --hang-report DIR "
                          "(`hangkit watch --report-dir DIR` writes one when it catches a hang)"))

    tail = got["log"]
    if isinstance(tail, tuple):
        kept, cut = tail
        b.members["output-tail.txt"] = b"".join(line + b"\n" for line in kept)
        how = (f"the last {len(kept)} lines" if len(kept) == lines
               else f"all {len(kept)} lines")
        if cut:
            how = f"the last {len(kept)} lines within its last {TAIL_LIMIT >> 20} MiB"
        b.held.append(("output-tail.txt", f"{len(kept)} lines",
                       f"{how} of {Path(log).absolute()}"))
    else:
        why = (f"reading {log} failed: {_why(tail)}" if isinstance(tail, Exception)
               else "no --log FILE given")
        b.missing.append(("output-tail.txt", why + "; give the job's output file with --log "
                          "FILE (PBS writes JOBNAME.oJOBID; see `qsub -o`)"))

    b.members["README.txt"] = _readme(b, host=host, now=now)
    secrets = secret_values(environ)
    b.members = {name: redact_member(name, data, secrets) for name, data in b.members.items()}
    return b


def gather(*, doctor_json: Path | None = None, hang_report: Path | None = None,
           log: Path | None = None, lines: int = DEFAULT_LINES,
           environ: Mapping[str, str] | None = None, cwd: Path | None = None,
           timeout: float = CHILD_TIMEOUT, now: float | None = None) -> dict[str, bytes | str]:
    """The archive's members, name -> content (secrets hidden): collect(...).members."""
    return collect(doctor_json=doctor_json, hang_report=hang_report, log=log, lines=lines,
                   environ=environ, cwd=cwd, timeout=timeout, now=now).members


def _missing_doctor(doctor: Any, given: Path | None, cwd: Path) -> str:
    if isinstance(doctor, Exception):
        return f"reading {given or cwd} failed: {_why(doctor)}"
    return (f"no --doctor-json given and no {DOCTOR_GLOB} in {cwd}; run `hangkit doctor --json "
            "hangkit-doctor.json` (with --ranks N inside the job) and make the bundle again")


def _versions(got: dict[str, Any]) -> dict:
    packages = got["packages"]
    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    if isinstance(packages, Exception):
        versions["packages_error"] = _why(packages)
        packages = {}
    versions.update({name: packages.get(name) for name in PACKAGES})
    for key in ("torch", "mpi"):
        found = got[key]
        versions[f"{key}_details"] = ({"status": "failed", "error": _why(found)}
                                      if isinstance(found, Exception) else found)
    mpi = versions["mpi_details"]
    versions["mpi_library"] = (mpi["library_version"].splitlines()[0]
                               if mpi.get("library_version") else None)
    torch = versions["torch_details"]
    versions["torch_cuda"], versions["torch_nccl"] = torch.get("cuda"), torch.get("nccl")
    return versions


def _readme(b: Bundle, *, host: str, now: float) -> str:
    from hangkit import __version__

    width = max(len(m) for m, _, _ in [*b.held, ("README.txt", "", "")])
    out = ["hangkit report bundle",
           f"made {_iso(now)} on {host} by `hangkit report` (hangkit {__version__})", "",
           "What people helping with a hang ask for, in one place. It holds your job's "
           "configuration and environment: values of variables whose names contain "
           + ", ".join(SECRET_WORDS) + f" are replaced by {REDACTED}, as are such NAME=value "
           "pairs in the output and this environment's secret values wherever they appeared; "
           "look through it before you share it.", "", "Contents:"]
    for member, _, about in b.held:
        out.append(f"  {member:<{width}}  {about}")
    out.append(f"  {'README.txt':<{width}}  this file")
    out += ["", "Missing:"]
    out += [f"  {member:<{width}}  {why}" for member, why in b.missing] or ["  nothing"]
    return "\n".join(out) + "\n"


# --- the archive ----------------------------------------------------------------------------

def default_name(now: float, host: str | None = None) -> str:
    short = (host or socket.gethostname()).split(".")[0]
    short = re.sub(r"[^A-Za-z0-9_-]", "_", short) or "host"
    return f"hangkit-report-{short}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.tar.gz"


def write_archive(members: Mapping[str, bytes | str], path: Path, *,
                  now: float | None = None) -> Path:
    """Writes a .tar.gz, 0600 (it holds a job's configuration) whatever the umask, with every
    member under one directory named like the archive. Written beside, then renamed, so no
    half-written archive is ever at `path`."""
    path = Path(path)
    now = time.time() if now is None else now
    prefix = re.sub(r"(\.tar\.gz|\.tgz|\.tar)$", "", path.name) or "hangkit-report"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            top = tarfile.TarInfo(prefix)
            top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o700, int(now)
            tar.addfile(top)
            for name, data in members.items():
                raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{prefix}/{name}")
                info.size, info.mode, info.mtime = len(raw), 0o600, int(now)
                tar.addfile(info, io.BytesIO(raw))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# --- the command ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="the archive to write (default: hangkit-report-HOST-TIME.tar.gz "
                        "in the current directory; a directory: that name in it)")
    parser.add_argument("--doctor-json", type=Path, default=None, metavar="FILE",
                        help="the doctor's results (`hangkit doctor --json FILE`; default: the "
                        f"newest {DOCTOR_GLOB} in the current directory)")
    parser.add_argument("--hang-report", type=Path, default=None, metavar="DIR",
                        help="the directory holding hang-report.json and .md (`hangkit watch "
                        "--report-dir`; default: the newest under the current directory, two "
                        "levels down)")
    parser.add_argument("--log", type=Path, default=None, metavar="FILE",
                        help="the job's output file, whose last lines go in (default: none)")
    parser.add_argument("--lines", type=int, default=DEFAULT_LINES, metavar="N",
                        help=f"how many of its last lines (default: {DEFAULT_LINES})")


def check_arguments(args) -> None:
    """Bad input becomes one UsageError naming the option and its value, before any waiting."""
    if args.lines < 1:
        raise UsageError(f"--lines {args.lines}: must be at least 1")
    for option, path in (("--log", args.log), ("--doctor-json", args.doctor_json)):
        if path is None:
            continue
        if not path.exists():
            raise UsageError(f"{option} {path}: no such file")
        if path.is_dir():
            raise UsageError(f"{option} {path}: is a directory, not a file")
        if not os.access(path, os.R_OK):
            raise UsageError(f"{option} {path}: not readable")
    if args.hang_report is not None:
        given = args.hang_report
        if not given.exists():
            raise UsageError(f"--hang-report {given}: no such directory")
        folder = given.parent if given.is_file() else given
        if not any((folder / n).is_file() for n in (HANG_JSON, HANG_MD)):
            raise UsageError(f"--hang-report {given}: holds no {HANG_JSON} or {HANG_MD}")
    if args.out is not None and not args.out.is_dir() and not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: no such directory: {args.out.parent}")


def run(args) -> int:
    check_arguments(args)
    now = time.time()
    out = Path(args.out) if args.out is not None else Path.cwd()
    if out.is_dir():
        out = out / default_name(now)
    hang = args.hang_report
    if hang is not None and hang.is_file():
        hang = hang.parent
    bundle = collect(doctor_json=args.doctor_json, hang_report=hang, log=args.log,
                     lines=args.lines, now=now)
    try:
        write_archive(bundle.members, out, now=now)
    except OSError as e:
        raise HangkitError(f"cannot write {out}: {e.strerror or e}",
                           hint="give --out a path on a writable filesystem") from e
    print(out.absolute())
    print(bundle.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hangkit.bundle`: the same as the hangkit subcommand."""
    from hangkit.cli import main as hangkit_main

    return hangkit_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
