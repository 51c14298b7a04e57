"""`hangkit explain PATH`: the verdict on a hang after the fact, from a hang report (its
directory or its JSON) or from a directory of Flight Recorder dumps torch wrote by itself
(TORCH_NCCL_DUMP_ON_TIMEOUT writes TORCH_FR_DUMP_TEMP_FILE + rank on a collective's timeout).

A report is diagnosed again from its records, so a report written by an older hangkit gets
today's rules. Dumps alone have no stacks: the verdict says which ranks and which collective,
not what the missing ranks were doing.
"""

from __future__ import annotations

from pathlib import Path

from hangkit.errors import UsageError
from hangkit.flight_recorder.dumps import read_directory
from hangkit.flight_recorder.rules import diagnose_views
from hangkit.flight_recorder.view import merge, render
from hangkit.monitor.report import JSON_NAME
from hangkit.records import Diagnosis


def explain(path: Path) -> list[str]:
    """The lines `hangkit explain` prints. UsageError for a path it cannot read."""
    if (path.is_dir() and (path / JSON_NAME).is_file()) or path.is_file():
        return _from_report(path)
    if path.is_dir():
        return _from_dumps(path)
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


def _from_dumps(directory: Path) -> list[str]:
    recordings = read_directory(directory)
    if not recordings:
        raise UsageError(f"{directory}: no {JSON_NAME} and no Flight Recorder dumps (files "
                         "named PREFIX<rank>, as TORCH_FR_DUMP_TEMP_FILE writes them)")
    views = merge(recordings)
    lines = [f"{directory}: Flight Recorder dumps of {len(recordings)} rank(s)", "",
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
