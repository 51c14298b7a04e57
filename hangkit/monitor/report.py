"""Hang reports: assembled from snapshots, rendered as text and Markdown, written privately."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from hangkit.errors import UsageError
from hangkit.files import private_directory, write_atomic
from hangkit.flight_recorder.dumps import write_for_analyzer
from hangkit.flight_recorder.rules import missing_reason
from hangkit.flight_recorder.view import of_processes, render
from hangkit.monitor.diagnose import diagnose
from hangkit.monitor.merge import groups, merged_tree, render_tree
from hangkit.monitor.stacks import frame_text
from hangkit.records import (
    Frame,
    HangReport,
    Look,
    NodeReport,
    ProcessSnapshot,
    RankStatus,
    Role,
    StallEvent,
    ThreadStack,
    WorkerState,
)
from hangkit.redact import redact_value, secret_values
from hangkit.text import iso_time, who

JSON_NAME = "hang-report.json"
MD_NAME = "hang-report.md"
# Frames a thread keeps in a report: the bundle reads at most 400 levels (a tree of 199 frames).
MAX_FRAMES, OUTER_FRAMES = 180, 40
ANALYZER = "torch.distributed.flight_recorder.fr_trace"


def build_report(*, reason: str, command: list[str], idle_seconds: float,
                 processes: list[ProcessSnapshot], last_lines: list[str], context: dict,
                 detector: str = "output", started_at: float | None = None,
                 capture_seconds: float | None = None, ranks: list[RankStatus] = (),
                 events: list[StallEvent] = (), looks: list[Look] = (),
                 nodes: list[NodeReport] = (), secrets: Sequence[str] | None = None
                 ) -> HangReport:
    """The report of one capture, its secrets hidden: every field (command lines, output
    lines, stacks, the reason, context, looks, diagnoses) goes through redact_value once,
    here, so every renderer and file gets the redacted report. `secrets`: literal values to
    scrub too (default: those of this process's secret environment variables, which the
    job's inherit). The snapshots given are not changed: the report holds copies."""
    diagnosis = diagnose(processes, list(events), list(looks))  # from the whole stacks
    processes = [dataclasses.replace(p, threads=[_within_frames(t) for t in p.threads])
                 for p in processes]
    context = dict(context)
    here = socket.gethostname()  # a report is built where its monitor runs
    context["ranks_on_this_node"] = sum(1 for p in processes if p.role == Role.RANK
                                        and p.host in (None, here))
    report = HangReport(
        hang=True, reason=reason, command=list(command),
        idle_seconds=round(idle_seconds, 1), detector=detector,
        started_at=iso_time(started_at) if started_at else None, captured_at=iso_time(),
        capture_seconds=round(capture_seconds, 2) if capture_seconds is not None else None,
        processes=processes, groups=groups(processes), tree=merged_tree(processes),
        diagnosis=diagnosis, last_lines=list(last_lines), context=context,
        ranks=list(ranks), events=list(events), looks=list(looks), nodes=list(nodes))
    if secrets is None:
        secrets = secret_values(os.environ)
    return HangReport.from_json(redact_value(report.to_json(), secrets))


def _within_frames(thread: ThreadStack) -> ThreadStack:
    """A thread's stack cut to MAX_FRAMES (a runaway recursion is thousands deep): its
    outermost OUTER_FRAMES and its innermost, where it is stuck, with a frame that says how
    many are not shown. The merged tree nests two levels a frame, and the report's readers
    take so many levels (safeload's limits, the bundle's the least)."""
    if len(thread.frames) <= MAX_FRAMES:
        return thread
    inner = MAX_FRAMES - OUTER_FRAMES - 1
    cut = len(thread.frames) - OUTER_FRAMES - inner
    marker = Frame(function=f"... {cut} frames not shown ...", file="")
    return dataclasses.replace(thread, frames=[*thread.frames[:OUTER_FRAMES], marker,
                                               *thread.frames[-inner:]])


def render_summary(report: HangReport) -> list[str]:
    """What a person reads first: where each group of ranks is, the tree, and the diagnosis."""
    # A snapshot (hangkit attach, watch's SIGUSR1) of a job found progressing is no hang.
    lines = [f"hangkit: {'HANG' if report.hang else 'SNAPSHOT'}: {report.reason}"]
    counts: dict[str, int] = {}
    for p in report.processes:
        counts[p.role] = counts.get(p.role, 0) + 1
    captured = ", ".join(f"{n} {role}" for role, n in sorted(counts.items()))
    if report.capture_seconds:
        captured += f" in {report.capture_seconds:.1f} s"
    lines.append(f"hangkit: captured {captured}")
    if report.nodes:
        lines += ["", "Nodes (each captured by its relay):"] + [
            "  " + n.describe() for n in report.nodes]
    if report.groups:
        lines.append("")
        lines.append("Where the ranks are:")
        for g in report.groups:
            lines.append(f"  {who(g.ranks, g.pids)}: {g.location}")
    if report.looks:
        lines += ["", "What hangkit saw before calling it:"] + ["  " + x for x in
                                                              render_looks(report.looks)]
    if report.ranks:
        lines += ["", "Progress reported by the ranks:"] + ["  " + r for r in render_ranks(report)]
    tree = render_tree(report.tree)
    if tree:
        lines += ["", "Merged stacks of the ranks' main threads:"] + ["  " + t for t in tree]
    collectives = render_collectives(report)
    if collectives:
        lines += ["", "Collectives, as torch's Flight Recorder holds them:"] + [
            "  " + c for c in collectives]
    if report.diagnosis:
        lines += ["", "Diagnosis:"]
        for d in report.diagnosis:
            lines.append(f"  [{d.kind}] {d.summary}")
            lines.append(f"      advice: {d.advice}")
    return lines


def render_ranks(report: HangReport) -> list[str]:
    """One line per rank from its beats, then the stall detector's findings."""
    lines = []
    for r in report.ranks:
        parts = [f"{r.key}: {r.status}"]
        if r.step is not None:
            parts.append(f"step {r.step}")
        if r.phase:
            parts.append(f"phase {r.phase!r} for {r.phase_seconds:.1f} s")
        parts.append(f"last progress {r.since_progress:.1f} s ago")
        if r.collective is not None:
            c = r.collective
            parts.append(f"in {c.describe()} for {c.seconds:.1f} s" if c.inside
                         else f"last finished {c.describe()}")
        if r.straggler_score is not None:
            parts.append(f"straggler score {r.straggler_score:.1f}")
        if r.error:
            parts.append(f"error: {r.error}")
        if r.exit:
            parts.append(f"its process {r.exit}")
        lines.append(", ".join(parts) + f" (pid {r.pid} on {r.host})")
        lines += [f"    {w}" for w in render_workers(r.workers)]
    lines += [f"[{e.kind}] {e.summary}" for e in report.events]
    return lines


def render_collectives(report: HangReport) -> list[str]:
    """The ranks' Flight Recorder dumps merged per process group (flight_recorder/view.py)."""
    views, ranks = of_processes(report.processes)
    return render(views, lambda r: missing_reason(ranks.get(r)))


def render_looks(looks: list[Look]) -> list[str]:
    """Each look: when, how long, its verdict, and each rank's and worker's activity."""
    lines = []
    for i, look in enumerate(looks, 1):
        lines.append(f"look {i} at {look.at:g} s ({look.seconds:.1f} s, {look.samples} samples "
                     f"a process): {look.verdict}")
        for p in look.processes:
            if not p.deciding:
                continue
            cpu = f", {p.cpu_percent:.0f}% CPU" if p.cpu_percent is not None else ""
            lines.append(f"  {p.label}: {p.activity} in {p.where} ({p.distinct} distinct "
                         f"stack(s){cpu})")
    return lines


def render_workers(workers: list[WorkerState]) -> list[str]:
    """A rank's DataLoader workers as its safe DataLoader last published them."""
    return [f"DataLoader {w.describe()}" for w in workers]


def render_markdown(report: HangReport) -> str:
    out = ["# hangkit hang report", "",
           f"- **Reason:** {report.reason} (detector: {report.detector})",
           f"- **Command:** `{' '.join(report.command)}`",
           f"- **Captured at:** {report.captured_at}"
           + (f" in {report.capture_seconds} s" if report.capture_seconds is not None else ""),
           ""]
    if report.diagnosis:
        out += ["## Diagnosis", ""]
        for d in report.diagnosis:
            out += [f"### {d.kind}", "", d.summary, "", f"**Advice:** {d.advice}", ""]
    if report.nodes:
        out += ["## Nodes", ""] + [f"- {n.describe()}" for n in report.nodes] + [""]
    if report.groups:
        out += ["## Where the ranks are", ""]
        out += [f"- **{who(g.ranks, g.pids)}**: {g.location}" for g in report.groups]
        out.append("")
    if report.looks:
        out += ["## What hangkit saw before calling it", "", "```", *render_looks(report.looks),
                "```", ""]
    if report.ranks:
        out += ["## Progress reported by the ranks", "", "```", *render_ranks(report), "```", ""]
    tree = render_tree(report.tree)
    if tree:
        out += ["## Merged stack tree (main threads)", "", "```", *tree, "```", ""]
    collectives = render_collectives(report)
    if collectives:
        out += ["## Collectives (torch's Flight Recorder)", "", "```", *collectives, "```", "",
                "torch's own analyzer reads the dumps beside this report: "
                f"`python -m {ANALYZER} --allow-incomplete-ranks DIR`.", ""]
    out += ["## Processes", ""]
    for p in report.processes:
        out += _process_markdown(p)
    if report.last_lines:
        out += [f"## Last {len(report.last_lines)} lines of output", "", "```",
                *report.last_lines, "```", ""]
    out += ["## Job context", "", "```json", json.dumps(report.context, indent=2), "```", ""]
    return "\n".join(out)


def _process_markdown(p: ProcessSnapshot) -> list[str]:
    head = f"### pid {p.pid}: {p.role}" + (f", rank {p.rank}" if p.rank is not None else "") \
        + (f", on {p.host}" if p.host else "")
    facts = [f"state {p.state}"]
    if p.cpu_percent is not None:
        facts.append(f"{p.cpu_percent:.0f}% CPU")
    if p.kernel_state:
        facts.append(f"kernel state {p.kernel_state}")
    if p.syscall:
        facts.append(p.syscall.describe())
    facts.append(f"parent {p.ppid}")
    lines = [head, "", f"`{' '.join(p.cmdline)}`", "", ", ".join(facts), ""]
    if p.note:
        lines += [f"Note: {p.note}", ""]
    if p.stack_error:
        lines += [f"No stacks: {p.stack_error}", ""]
    for t in p.threads:
        flags = [x for x, on in (("main", t.is_main), ("holds GIL", t.owns_gil)) if on]
        lines.append(f"Thread {t.os_thread_id} {t.name or ''}"
                     + (f" ({', '.join(flags)})" if flags else ""))
        lines.append("```")
        lines += [f"  {frame_text(f)}" for f in t.frames]
        lines += ["```", ""]
    return lines


def write_report(report: HangReport, directory: Path) -> tuple[Path, Path]:
    """Writes both files, 0600 inside a 0700 directory: stacks and environments can hold
    secrets. The ranks' Flight Recorder dumps go beside them, one file per rank, in the layout
    torch's analyzer reads."""
    directory = private_directory(directory)
    json_path, md_path = directory / JSON_NAME, directory / MD_NAME
    write_atomic(json_path, json.dumps(report.to_json(), indent=2) + "\n", mode=0o600)
    write_atomic(md_path, render_markdown(report), mode=0o600)
    write_for_analyzer([p.recording for p in report.processes if p.role == Role.RANK
                        and p.recording is not None and p.recording.dump], directory)
    return json_path, md_path


def read_report(path: Path, problems: list[str] | None = None) -> tuple[Path, HangReport]:
    """A report written by `hangkit watch` or a `%%hk` cell: its directory or its JSON, read
    within limits (size, depth, values: hangkit/safeload.py) and with every value longer than
    text.SHOWN_CHARACTERS cut, as whoever reads a report shows it. UsageError of one line
    naming the path when it is no report, or when a field holds the wrong type. Given a list
    `problems`, such fields read as their defaults instead, each named there; and the ranks'
    Flight Recorder dumps, if they cannot be one job's, are left out and said so."""
    from hangkit.flight_recorder.dumps import implausible
    from hangkit.safeload import REPORT_LIMITS, Refused, load_json, read_bytes
    from hangkit.text import SHOWN_CHARACTERS

    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    if not path.exists():
        raise UsageError(f"no such file or directory: {path}")
    data = read_bytes(path, REPORT_LIMITS)
    found: list[str] = []
    try:
        report = HangReport.from_json(load_json(data, REPORT_LIMITS, cut_at=SHOWN_CHARACTERS),
                                      found)
    except Refused as e:
        raise UsageError(f"{path}: not a hang report hangkit reads ({e})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{path}: not a hang report ({type(e).__name__}: {e})") from None
    dumped = [p for p in report.processes if p.recording is not None and p.recording.dump]
    why = implausible([p.recording for p in dumped])
    if why:  # the merged view would walk every sequence number between
        found.append(f"processes[].recording: {why}")
        for p in dumped:
            p.recording = dataclasses.replace(p.recording, dump={}, error=f"left out: {why}")
    if found and problems is None:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UsageError(f"{path}: not a hang report hangkit reads: {found[0]}{more}")
    if problems is not None:
        problems.extend(found)
    return path, report
