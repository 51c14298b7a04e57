"""`hangkit explain PATH`: the verdict on a hang after the fact, from a hang report (its
directory or its JSON) or from a directory of Flight Recorder dumps torch wrote by itself
(TORCH_NCCL_DUMP_ON_TIMEOUT writes TORCH_FR_DUMP_TEMP_FILE + rank on a collective's timeout).

A report is diagnosed again from its records, so a report written by an older hangkit gets
today's rules. Dumps alone have no stacks: the verdict says which ranks and which collective,
not what the missing ranks were doing. One dump file (a name ending in its rank) is read as
the only rank there is.

Whatever the file holds, this prints or fails with one line: reports and dumps are read under
limits (hangkit/safeload.py), values longer than text.SHOWN_CHARACTERS are cut, and in a
directory others can write (/tmp) only the user's own dumps are read, the others named.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hangkit.errors import HangkitError, UsageError
from hangkit.flight_recorder.dumps import dump_rank, implausible, read_directory, read_dump
from hangkit.flight_recorder.rules import diagnose_views
from hangkit.flight_recorder.view import merge, render
from hangkit.monitor.report import JSON_NAME
from hangkit.records import Diagnosis, Recording
from hangkit.text import SHOWN_CHARACTERS, cut


def explain(path: Path) -> list[str]:
    """The lines `hangkit explain` prints. UsageError for a path it cannot read."""
    try:
        return _explain(path)
    except HangkitError:
        raise
    except Exception as e:  # what the limits let through and a rule then trips on: one line
        raise UsageError(f"{path}: could not be explained ({type(e).__name__}: "
                         f"{cut(str(e), 200)})", hint="a bug in hangkit: please report it "
                         "with the file") from e


def _explain(path: Path) -> list[str]:
    a_file = path.exists() and not path.is_dir()  # a FIFO too: its reader says what it is
    if a_file and dump_rank(path) is not None:
        dump = read_dump(path, cut_at=SHOWN_CHARACTERS)
        return _from_dumps(path, [Recording(rank=dump_rank(path), dump=dump, source=str(path))])
    if (path.is_dir() and (path / JSON_NAME).is_file()) or a_file:
        return _from_report(path)
    if path.is_dir():
        skipped: list[str] = []
        recordings = read_directory(path, cut_at=SHOWN_CHARACTERS, skipped=skipped)
        return _from_dumps(path, recordings, skipped)
    raise UsageError(f"no such file or directory: {path}")


def _from_report(path: Path) -> list[str]:
    from hangkit.monitor.diagnose import diagnose  # the same rules as at capture
    from hangkit.monitor.report import read_report, render_collectives

    path, report = read_report(path)
    found = diagnose(report.processes, report.events, report.looks)
    lines = [f"{path}: {report.reason}"]
    collectives = render_collectives(report)
    if collectives:
        lines += ["", "Collectives, as torch's Flight Recorder holds them:",
                  *("  " + c for c in collectives)]
    return lines + _verdicts(found)


def _from_dumps(directory: Path, recordings: list[Recording], skipped: Sequence[str] = ()
                ) -> list[str]:
    if not recordings:
        raise UsageError(f"{directory}: no {JSON_NAME} and no Flight Recorder dumps (files "
                         "named PREFIX<rank>, as TORCH_FR_DUMP_TEMP_FILE writes them)"
                         + (f"; {skipped[0]}" if skipped else ""))
    why = implausible(recordings)
    if why:
        raise UsageError(f"{directory}: {why}; give one job's dumps")
    views = merge(recordings)
    lines = [f"{directory}: Flight Recorder dumps of {len(recordings)} rank(s)",
             *skipped, "",
             "Collectives:", *("  " + x for x in render(views, lambda r: "no file for it here"))]
    found = diagnose_views(views)
    if not found:
        lines += ["", "No disagreement: every rank issued and completed the same collectives."]
    return lines + _verdicts(found)


def _verdicts(found: list[Diagnosis]) -> list[str]:
    lines = ["", "Diagnosis:"] if found else []
    for d in found:
        lines += [f"  [{d.kind}] {d.summary}", f"      advice: {d.advice}"]
    return lines
