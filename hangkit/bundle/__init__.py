"""`hangkit report`: what users are asked to send when a hang persists, in one .tar.gz.

The bundle holds the job's configuration (job.json), the software versions (versions.json), the
environment (environment.json), the latest doctor results (doctor.json), the latest hang report
(hang-report/), the Flight Recorder dumps torch wrote itself on a collective's timeout
(flight-recorder/, as JSON), the tail of the job's output (output-tail.txt) and a README.txt
saying what is there and what was missing and why. Members sit under one directory named like
the archive, so unpacking it spills nothing into the current directory.

A bundle is made when something is already stuck, so nothing here may hang: torch and mpi4py are
imported only in child processes killed at their deadline (importing torch from a stalled shared
filesystem never returns), and every file is read in a daemon thread that is given up on at the
deadline (a read from a stalled Lustre mount blocks in the kernel, where no timeout reaches).
Nor may a file someone else wrote: dumps, the hang report and the doctor's JSON are read within
limits (hangkit/safeload.py), one that is not what it should be stops the bundle with one line
(exit 2), and of the dumps in a directory others can write (/tmp) only the user's own are
taken, each other one named (README.txt, stderr).

Secrets: every member passes through one redaction step, redact_member (hangkit.redact: JSON
value by value with redact_value, the rest line by line): variables whose names say secret
(API_KEY, HF_TOKEN, DB_PASSWORD, db_pw, ...) are hidden by name; free text (output lines, JSON
strings, command lines) has `NAME=value`, `NAME: value`, `--name value`, URL passwords and
tokens by their shape (hf_, sk-, ghp_, AKIA, JWTs, Bearer, ...) hidden; and the values of this
environment's secret variables are then scrubbed wherever they still appear (a key passed on a
command line and echoed into the output).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hangkit.bundle.archive import default_name, write_archive
from hangkit.bundle.job import job_config, read_nodefile
from hangkit.bundle.versions import error_text, version_tasks, versions_json
from hangkit.deadline import call_all
from hangkit.errors import UsageError
from hangkit.files import TAIL_LIMIT, tail_lines
from hangkit.flight_recorder.dumps import dump_files, read_dump
from hangkit.flight_recorder.environment import (
    DUMP_PREFIX_VARIABLES,
    JOB_DUMP_DIRECTORY,
    dump_prefixes,
)
from hangkit.monitor.report import JSON_NAME, MD_NAME
from hangkit.records import HangReport
from hangkit.redact import (
    REDACTED,
    SECRET_WORDS,
    is_secret_name,
    redact_environ,
    redact_member,
    redact_text,
    secret_values,
)
from hangkit.safeload import (
    REPORT_LIMITS,
    Limits,
    NotYours,
    Refused,
    load_json,
    read_bytes,
    shared_directory,
)
from hangkit.text import iso_time

CHILD_TIMEOUT = 20.0  # seconds for each child (torch, mpi4py) and for each file read
DEFAULT_LINES = 50
DOCTOR_GLOB = "hangkit-doctor*.json"
MAX_FLIGHT_DUMPS = 512  # torch's own dumps taken, one per rank: the first ranks' if more
# What the bundle's JSON members are read within. Redaction (redact_value) recurses up to two
# Python frames a level, and Python stops at 1,000: 400 levels (a stack tree of 199 frames).
BUNDLE_LIMITS = Limits(bytes=REPORT_LIMITS.bytes, depth=400, objects=REPORT_LIMITS.objects)
MAX_SKIPPED_NAMED = 10  # files not the user's, named one by one; past these, counted
HANG_JSON, HANG_MD = JSON_NAME, MD_NAME  # what `hangkit watch` writes


# --- what goes in ---------------------------------------------------------------------------

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
    return None if path is None else (path, _json_file(path, "the doctor's results"))


def _json_file(path: Path, what: str) -> bytes:
    """A JSON file's bytes, once it is known to be JSON within BUNDLE_LIMITS: UsageError of
    one line otherwise (a file nested 10,000 deep would crash the redaction)."""
    data = read_bytes(path, BUNDLE_LIMITS)
    try:
        load_json(data, BUNDLE_LIMITS)
    except Refused as e:
        raise UsageError(f"{path}: not {what} as hangkit reads them ({e})") from None
    return data


def _report_file(path: Path) -> bytes:
    """hang-report.json's bytes, once read as a hang report: UsageError naming the first
    field of the wrong type, as `hangkit explain` says it."""
    data = read_bytes(path, BUNDLE_LIMITS)
    problems: list[str] = []
    try:
        HangReport.from_json(load_json(data, BUNDLE_LIMITS), problems)
    except (Refused, TypeError) as e:
        raise UsageError(f"{path}: not a hang report hangkit reads ({e})") from None
    if problems:
        raise UsageError(f"{path}: not a hang report hangkit reads: {problems[0]}",
                         hint="give another with --hang-report DIR")
    return data


def _read_hang_report(given: Path | None, cwd: Path) -> tuple[Path, dict[str, bytes]] | None:
    if given is None:
        found = _newest([*cwd.glob(HANG_JSON), *cwd.glob("*/" + HANG_JSON),
                         *cwd.glob("*/*/" + HANG_JSON)])
        if found is None:
            return None
        given = found.parent
    elif given.is_file():  # hang-report.json itself
        given = given.parent
    files = {name: _report_file(given / name) if name == HANG_JSON
             else read_bytes(given / name, BUNDLE_LIMITS)
             for name in (HANG_JSON, HANG_MD) if (given / name).is_file()}
    return (given, files) if files else None


def _read_flight_dumps(environ: Mapping[str, str], cwd: Path
                       ) -> tuple[str, dict[str, str], int, list[str]]:
    """torch's own Flight Recorder dumps under TORCH_FR_DUMP_TEMP_FILE's prefix, else in the
    newest directory a Polaris job script had them written to under cwd, as JSON (a pickle
    could not be redacted, and no one should unpickle a stranger's): (where, {name: JSON},
    how many files there were, the files skipped as not the user's).

    Unless TORCH_FR_DUMP_TEMP_FILE (or TORCH_NCCL_DEBUG_INFO_TEMP_FILE) says where, the first
    of torch 2.7+'s default ($XDG_CACHE_HOME/torch/comm_lib_trace_rank_, else
    $HOME/.cache/torch/...) and the older /tmp/nccl_trace_rank_ that holds any
    (environment.dump_prefixes). Anyone can put a file in /tmp: in a
    directory others can write, only the user's own files are read (safeload.NotYours)."""
    prefixes = dump_prefixes(dict(environ))
    prefix, files = next(((p, f) for p in prefixes if (f := dump_files(p))),
                         (prefixes[0], []))
    job_dir = _newest(p for p in cwd.glob(JOB_DUMP_DIRECTORY + "*") if p.is_dir())
    if not files and job_dir is not None:
        prefix = str(job_dir / "nccl_trace_rank_")
        files = dump_files(prefix)
    shared = bool(files) and shared_directory(files[0].parent)
    dumps: dict[str, str] = {}
    skipped: list[str] = []
    for p in files:
        if len(dumps) == MAX_FLIGHT_DUMPS:
            break
        try:
            dumps[f"{p.name}.json"] = json.dumps(read_dump(p, owned_only=shared), indent=1) + "\n"
        except NotYours as e:
            skipped.append(str(e))
    return prefix, dumps, len(files), skipped


# --- the bundle -----------------------------------------------------------------------------

@dataclass
class Bundle:
    """Members (name -> content, secrets already hidden), what each holds, and what is missing.
    README.txt and the one-line summary are renderings of held and missing."""

    members: dict[str, bytes | str] = field(default_factory=dict)
    held: list[tuple[str, str, str]] = field(default_factory=list)  # (member, brief, about)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (member, why, what to do)
    notes: list[str] = field(default_factory=list)  # files skipped, said on stderr too

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
    got = call_all({
        **version_tasks(timeout, environ),
        "nodefile": (lambda: read_nodefile(environ), timeout),
        "doctor": (lambda: _read_doctor(doctor_json, cwd), timeout),
        "hang": (lambda: _read_hang_report(hang_report, cwd), timeout),
        "flight": (lambda: _read_flight_dumps(environ, cwd), timeout),
        "log": (lambda: None if log is None else tail_lines(Path(log), lines), timeout),
    })
    for name in ("doctor", "hang", "flight"):  # a file that is no such thing: one line, exit 2
        if isinstance(got[name], UsageError):
            raise got[name]
    b = Bundle()

    nodes, per_host = got["nodefile"] if not isinstance(got["nodefile"], Exception) else ([], {})
    job = job_config(environ, nodes, per_host, cwd=str(cwd), host=host, now=now)
    if isinstance(got["nodefile"], Exception):
        job["pbs_nodefile_error"] = error_text(got["nodefile"])
    b.members["job.json"] = json.dumps(job, indent=2) + "\n"
    where = (f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}" if job["in_pbs_job"]
             else "not a PBS job")
    b.held.append(("job.json", where, "the job: its nodes (PBS_NODEFILE), ranks per node where "
                   "known, every PBS_* (and PALS_*, PMI_*) variable, host and directory"))

    b.members["versions.json"] = json.dumps(versions_json(got), indent=2) + "\n"
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
            why = f"reading {hang_report or cwd} failed: {error_text(hang)}"
        elif hang_report is not None:
            why = f"no {HANG_JSON} or {HANG_MD} in {hang_report}"
        else:
            why = f"none found under {cwd} (*/{HANG_JSON}, two levels down)"
        b.missing.append(("hang-report/", why + "; give its directory with --hang-report DIR "
                          "(`hangkit watch --report-dir DIR` writes one when it catches a hang)"))

    flight = got["flight"]
    if isinstance(flight, tuple) and flight[3]:
        skipped = flight[3]
        b.notes += skipped[:MAX_SKIPPED_NAMED] + (
            [f"skipped {len(skipped) - MAX_SKIPPED_NAMED} more files not yours"]
            if len(skipped) > MAX_SKIPPED_NAMED else [])
    if isinstance(flight, tuple) and flight[1]:
        prefix, dumps, count, _ = flight
        for name, data in dumps.items():
            b.members[f"flight-recorder/{name}"] = data
        b.held.append(("flight-recorder/", f"{len(dumps)} of {count} ranks", "the Flight "
                       f"Recorder dumps torch wrote on a timeout, from {prefix}RANK, as JSON "
                       "(`hangkit explain flight-recorder/` reads them)"
                       + "".join(f"; {note}" for note in b.notes)))
    elif (isinstance(flight, Exception) or b.notes
          or any(environ.get(n) for n in DUMP_PREFIX_VARIABLES)):
        # Missing only where some were expected: most jobs never time a collective out.
        why = (f"reading them failed: {error_text(flight)}" if isinstance(flight, Exception)
               else "; ".join(b.notes) if b.notes else f"none under {flight[0]}RANK")
        b.missing.append(("flight-recorder/", why + "; torch writes them on a collective's "
                          "timeout (TORCH_NCCL_DUMP_ON_TIMEOUT) to TORCH_FR_DUMP_TEMP_FILE + "
                          "rank: a path on a shared filesystem outlives the nodes"))

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
        why = (f"reading {log} failed: {error_text(tail)}" if isinstance(tail, Exception)
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
        return f"reading {given or cwd} failed: {error_text(doctor)}"
    return (f"no --doctor-json given and no {DOCTOR_GLOB} in {cwd}; run `hangkit doctor --json "
            "hangkit-doctor.json` (with --ranks N inside the job) and make the bundle again")


def _readme(b: Bundle, *, host: str, now: float) -> str:
    from hangkit import __version__

    width = max(len(m) for m, _, _ in [*b.held, ("README.txt", "", "")])
    out = ["hangkit report bundle",
           f"made {iso_time(now)} on {host} by `hangkit report` (hangkit {__version__})", "",
           "What people helping with a hang ask for, in one place. It holds your job's "
           "configuration and environment: values of variables whose names say secret ("
           + ", ".join(SECRET_WORDS) + f", PW, ...) are replaced by {REDACTED}, as are such "
           "NAME=value pairs, URL passwords and known token shapes in the output, and this "
           "environment's secret values wherever they appeared; look through it before you "
           "share it.", "", "Contents:"]
    for member, _, about in b.held:
        out.append(f"  {member:<{width}}  {about}")
    out.append(f"  {'README.txt':<{width}}  this file")
    out += ["", "Missing:"]
    out += [f"  {member:<{width}}  {why}" for member, why in b.missing] or ["  nothing"]
    return "\n".join(out) + "\n"


__all__ = [
    "CHILD_TIMEOUT", "DEFAULT_LINES", "DOCTOR_GLOB", "HANG_JSON", "HANG_MD", "TAIL_LIMIT",
    "Bundle", "add_arguments", "check_arguments", "collect", "default_name", "gather",
    "job_config", "main", "redact_member", "run", "secret_values", "tail_lines",
    "write_archive",
]
_COMMAND = ("add_arguments", "check_arguments", "main", "run")


def __getattr__(name: str):
    # The command is built on this module (collect, the defaults), so importing it here at
    # import time would be an import cycle; its names are still importable from here.
    if name in _COMMAND:
        return getattr(importlib.import_module("hangkit.bundle.command"), name)
    raise AttributeError(f"module 'hangkit.bundle' has no attribute {name!r}")
