"""`show_report(path)`: a hang report written by `hangkit watch` in a batch job (or by a `%%hk`
cell), opened in the notebook: the verdict first, then a table of the ranks, the merged tree,
the collectives and the DataLoader workers, and a plot of where each rank's steps stood.

A pure renderer of the HangReport (records in, widgets or text out); without a frontend
(HANGKIT_NONINTERACTIVE, a terminal) it prints the same text `hangkit watch` printed.

A report is a file anyone may have written or mangled: read_report reads it within limits and
cuts long values; a field of the wrong type reads as its default, and the view says which
("Could not read or show:"), as it says which part it could not draw. Showing never raises.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hangkit.jupyter.dashboard_format import collective_text, format_duration
from hangkit.jupyter.display import STATE_COLOURS, has_frontend, register_figure_png
from hangkit.jupyter.tree_view import tree_html
from hangkit.monitor.report import (
    read_report,
    render_collectives,
    render_summary,
    render_workers,
)
from hangkit.records import HangReport
from hangkit.text import cut

MONO = "font-family: monospace; white-space: pre; font-size: 12px"


class ReportView:
    """One report, shown: `text()` is what a terminal gets; in a notebook it displays itself
    as widgets. `problems`: what read_report could not read (fields read as defaults)."""

    def __init__(self, report: HangReport, path: Path, problems: Sequence[str] = ()):
        self.report, self.path = report, path
        self.problems = list(problems)
        self.failed: list[str] = []  # the parts that could not be shown, and why

    def _shown(self, part: str, render: Callable[[], Any], instead: Any) -> Any:
        try:
            return render()
        except Exception as e:  # a report's odd value must not take the rest of it down
            self.failed.append(f"{part}: {type(e).__name__}: {cut(str(e), 200)}")
            return instead

    def missing(self) -> list[str]:
        """What could not be read or shown, one line each; empty for a whole report."""
        said = list(dict.fromkeys(self.problems + self.failed))
        return ["Could not read or show:", *(f"  {x}" for x in said)] if said else []

    def text(self) -> str:
        summary = self._shown("the summary", lambda: render_summary(self.report),
                              [f"hangkit: {getattr(self.report, 'reason', '')}"])
        return "\n".join([f"{self.path}", *summary, *self.missing()])

    def rank_rows(self) -> list[list[str]]:
        """One row per rank: rank, state, step, phase, collective, last progress, where, and
        its DataLoader workers."""
        def row(r) -> list[str]:
            return [r.key, str(r.status), "-" if r.step is None else str(r.step), r.phase or "",
                    collective_text(r), f"{format_duration(r.since_progress)} ago",
                    f"pid {r.pid} on {r.host}", "; ".join(render_workers(r.workers))]

        return [self._shown(f"the row of {getattr(r, 'key', '?')}", lambda r=r: row(r),
                            [str(getattr(r, "key", "?")), "could not be shown"])
                for r in self.report.ranks]

    def figure(self) -> Figure:
        """Each rank's last step, coloured by its state: the rank behind the others shows."""
        register_figure_png()
        fig = Figure(figsize=(7, 2.6), layout="constrained")
        ax = fig.add_subplot()
        ranks = [r for r in self.report.ranks if r.rank is not None]
        if not ranks:
            ax.text(0.5, 0.5, "no rank reported progress", ha="center", va="center")
            ax.set_axis_off()
            return fig
        ax.bar([str(r.rank) for r in ranks], [r.step or 0 for r in ranks],
               color=[STATE_COLOURS.get(r.status, "#9e9e9e") for r in ranks])
        ax.set_xlabel("rank")
        ax.set_ylabel("last step")
        ax.set_title("Where each rank's training stood (colour: its state)")
        return fig

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if not has_frontend():
            print(self.text())
            return
        import ipywidgets as widgets

        parts = [widgets.HTML(html_part) for html_part in self.html_parts()]
        plot = widgets.Output()
        parts.append(plot)
        missing = widgets.HTML()
        parts.append(missing)
        display(widgets.VBox(parts))
        with plot:
            figure = self._shown("the plot", self.figure, None)
            if figure is not None:
                display(figure)
        missing.value = self.missing_html()

    def html_parts(self) -> list[str]:
        """The widget's parts as HTML: the verdict, the ranks' table, the merged tree, the
        collectives; a part that cannot be shown is left out and named in missing()."""
        r = self.report

        def head() -> str:
            verdict = "".join(f"<p><b>[{html.escape(d.kind)}]</b> {html.escape(d.summary)}"
                              f"<br><i>{html.escape(d.advice)}</i></p>" for d in r.diagnosis)
            return (f"<h3>Hang report: {html.escape(r.reason)}</h3><p>"
                    f"{html.escape(str(self.path))}, captured {html.escape(r.captured_at or '?')}"
                    f"</p>{verdict}")

        def table() -> str:
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                            + "</tr>" for row in self.rank_rows())
            return ("<table><tr><th>rank</th><th>state</th><th>step</th><th>phase</th>"
                    "<th>collective</th><th>progress</th><th>process</th><th>workers</th></tr>"
                    f"{cells}</table>")

        def tree() -> str:
            return ("<b>Merged stacks of the ranks' main threads</b>"
                    + tree_html(r.tree, r.diagnosis)) if r.tree.children else ""

        def collectives() -> str:
            lines = render_collectives(r)
            return (f"<b>Collectives (torch's Flight Recorder)</b><div style='{MONO}'>"
                    f"{html.escape(chr(10).join(lines))}</div>") if lines else ""

        parts = [self._shown("the verdict", head,
                             f"<h3>Hang report</h3><p>{html.escape(str(self.path))}</p>")]
        if r.ranks:
            parts.append(self._shown("the table of ranks", table, ""))
        parts.append(self._shown("the merged stacks", tree, ""))
        parts.append(self._shown("the collectives", collectives, ""))
        return [p for p in parts if p]

    def missing_html(self) -> str:
        lines = self.missing()
        return (f"<div style='{MONO}; color:#b71c1c'>{html.escape(chr(10).join(lines))}</div>"
                if lines else "")


def show_report(path: str | Path) -> ReportView:
    """Opens a hang report (its directory, or hang-report.json): shown when it ends a cell.
    UsageError for a file that is no hang report; fields of the wrong type read as their
    defaults, and the view names them."""
    problems: list[str] = []
    found, report = read_report(Path(path), problems)
    return ReportView(report, found, problems)
