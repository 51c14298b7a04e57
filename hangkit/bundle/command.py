"""`hangkit report` as a command: its options, their checks (bad input is one line and exit 2,
before any waiting), and writing the archive where --out says."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hangkit.bundle import DEFAULT_LINES, DOCTOR_GLOB, HANG_JSON, HANG_MD, collect
from hangkit.bundle.archive import default_name, write_archive
from hangkit.errors import HangkitError, UsageError
from hangkit.files import NotYourDirectory, writable_directory


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
    writable_directory(out.parent)  # before the waiting: write_archive checks it again
    hang = args.hang_report
    if hang is not None and hang.is_file():
        hang = hang.parent
    bundle = collect(doctor_json=args.doctor_json, hang_report=hang, log=args.log,
                     lines=args.lines, now=now)
    try:
        write_archive(bundle.members, out, now=now)
    except NotYourDirectory:
        raise
    except OSError as e:
        raise HangkitError(f"cannot write {out}: {e.strerror or e}",
                           hint="give --out a path on a writable filesystem") from e
    for note in bundle.notes:  # "skipped /tmp/nccl_trace_rank_0: owned by uid 1001, not you"
        print(f"hangkit: {note}", file=sys.stderr)
    print(out.absolute())
    print(bundle.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hangkit.bundle`: the same as the hangkit subcommand."""
    from hangkit.cli import main as hangkit_main

    return hangkit_main(["report", *(sys.argv[1:] if argv is None else argv)])
