"""`attach(target)`: a look, from the notebook, at a running job hangkit did not start (a
batch job's pid on this node, or its PBS job id), shown as `show_report` shows a report.

    from hangkit.jupyter import attach
    attach(12345)           # a pid of the job: its mpiexec, or one of its ranks
    attach("4242.polaris")  # a PBS job id: each of its nodes looks at its own processes

The look is the one `hangkit attach` takes (monitor/attach.py): every process sampled and
classed, then captured, diagnosed and written as a report. It runs under a deadline
(hangkit/deadline.py), so a job, a filesystem or a node that does not answer never freezes
the kernel. What comes back displays itself when it ends a cell: a hung job as the report's
widgets (text without a frontend), a progressing job as the lines that say which ranks were
progressing and doing what, and an error (no such job, a bad target, the deadline) as one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hangkit import deadline
from hangkit.errors import (
    HangkitError,
    UsageError,
    check_positive_seconds,
    check_seconds_or_zero,
)

# Seconds the kernel gives an attach on top of its `timeout`: the look and capture (seconds),
# the report, and other nodes reached over ssh (a minute each at most, all at once).
SLACK = 120.0


class AttachView:
    """What `attach()` found: `result` (monitor/attach.py's AttachResult) or `error` (a
    HangkitError, said in one line). `text()` is what a terminal gets; in a notebook it
    displays itself."""

    def __init__(self, target: int | str, result=None, error: HangkitError | None = None):
        self.target, self.result, self.error = target, result, error

    @property
    def verdict(self) -> str | None:
        """"hung", "progressing", "snapshot" or "unknown" (no stacks could be read); None
        after an error."""
        return None if self.result is None else self.result.verdict

    def report_view(self):
        """The report as show_report shows it (a ReportView), or None when there is none or
        the job is progressing (its lines say more than a report of a job at work)."""
        from hangkit.jupyter.report_view import ReportView

        r = self.result
        if r is None or r.report is None or r.verdict == "progressing":
            return None
        return ReportView(r.report, Path(r.paths[0]) if r.paths else Path("."))

    def lines(self) -> list[str]:
        """The words shown besides the report: the error, or the verdict's line, or (for a
        job at work) the summary, and where the report went."""
        if self.error is not None:
            return [f"hangkit: error: {self.error.one_line()}"]
        r = self.result
        said = r.message and any(r.message in line for line in r.summary)
        out = [] if said or not r.message else [f"hangkit: {r.message}"]
        if self.report_view() is None:
            out += r.summary
        else:  # the report's own lines are in the view; what attach added (--end) is not
            from hangkit.monitor.report import render_summary

            shown = set(render_summary(r.report))
            out += [line for line in r.summary if line not in shown]
        if r.paths and self.report_view() is None:  # the view names its own file
            out.append(f"hangkit: report: {r.paths[1]} (and {Path(r.paths[0]).name} beside it)")
        return out

    def text(self) -> str:
        view = self.report_view()
        return "\n".join(self.lines() + ([view.text()] if view is not None else []))

    def _ipython_display_(self) -> None:
        from IPython.display import display

        from hangkit.jupyter.display import has_frontend

        if self.error is not None:  # as %%hk says its errors: one line on stderr
            print(self.text(), file=sys.stderr)
            return
        if not has_frontend():
            print(self.text())
            return
        lines = self.lines()
        if lines:
            print("\n".join(lines))
        view = self.report_view()
        if view is not None:
            display(view)

    def __repr__(self) -> str:
        what = f"error: {self.error.one_line()}" if self.error else self.verdict
        return f"<hangkit attach {self.target!r}: {what}>"


def attach(target: int | str, *, timeout: float = 0.0, hosts: list[str] | None = None,
           end: bool = False, report_dir: str | os.PathLike | None = None,
           wait: float | None = None) -> AttachView:
    """Looks at the running job `target` belongs to (a pid on this node, int) or at PBS job
    `target` (str; on `hosts`, default its nodes), as `hangkit attach` does: one look, or looks
    again and again for `timeout` seconds, judging the last against all it saw; writes the
    report (under `report_dir`, default a new hangkit-report-* directory here); ends the job
    if `end` and it is hung. The kernel waits `wait` seconds at most (default `timeout` +
    120). Errors come back in the view (`.error`), said in one line, never raised."""
    try:
        check_seconds_or_zero("timeout", timeout)
        if isinstance(target, int) and not isinstance(target, bool) and target <= 0:
            raise UsageError(f"attach to a pid of the job (a positive number), not {target}")
        limit = timeout + SLACK if wait is None else check_positive_seconds("wait", wait)
        from hangkit.monitor.attach import attach as attach_job

        result = deadline.call(
            lambda: attach_job(target, hosts=hosts, timeout=timeout, end=end,
                               report_dir=report_dir),
            timeout=limit, name=f"attach to {target!r}")
    except HangkitError as e:
        return AttachView(target, error=e)
    return AttachView(target, result)
