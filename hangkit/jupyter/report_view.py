"""`show_report(path)`: a hang report written by `hangkit watch` in a batch job (or by a `%%hk`
cell), opened in the notebook: the verdict first, then a table of the ranks, the merged tree,
the collectives and the DataLoader workers, and a plot of where each rank's steps stood.

A pure renderer of the HangReport (records in, widgets or text out); without a frontend
(HANGKIT_NONINTERACTIVE, a terminal) it prints the same text `hangkit watch` printed.
"""

from __future__ import annotations

import html
from pathlib import Path

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

MONO = "font-family: monospace; white-space: pre; font-size: 12px"


class ReportView:
    """One report, shown: `text()` is what a terminal gets; in a notebook it displays itself
    as widgets."""

    def __init__(self, report: HangReport, path: Path):
        self.report, self.path = report, path

    def text(self) -> str:
        return "\n".join([f"{self.path}", *render_summary(self.report)])

    def rank_rows(self) -> list[list[str]]:
        """One row per rank: rank, state, step, phase, collective, last progress, where, and
        its DataLoader workers."""
        return [[r.key, str(r.status), "-" if r.step is None else str(r.step), r.phase or "",
                 collective_text(r), f"{format_duration(r.since_progress)} ago",
                 f"pid {r.pid} on {r.host}", "; ".join(render_workers(r.workers))]
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

        r = self.report
        verdict = "".join(f"<p><b>[{html.escape(d.kind)}]</b> {html.escape(d.summary)}<br>"
                          f"<i>{html.escape(d.advice)}</i></p>" for d in r.diagnosis)
        head = (f"<h3>Hang report: {html.escape(r.reason)}</h3><p>{html.escape(str(self.path))}"
                f", captured {html.escape(r.captured_at or '?')}</p>{verdict}")
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                        for row in self.rank_rows())
        table = ("<table><tr><th>rank</th><th>state</th><th>step</th><th>phase</th>"
                 f"<th>collective</th><th>progress</th><th>process</th><th>workers</th></tr>"
                 f"{cells}</table>")
        parts = [widgets.HTML(head)]
        if r.ranks:
            parts.append(widgets.HTML(table))
        if r.tree.children:
            parts.append(widgets.HTML("<b>Merged stacks of the ranks' main threads</b>"
                                      + tree_html(r.tree, r.diagnosis)))
        collectives = render_collectives(r)
        if collectives:
            parts.append(widgets.HTML(f"<b>Collectives (torch's Flight Recorder)</b><div "
                                      f"style='{MONO}'>{html.escape(chr(10).join(collectives))}"
                                      "</div>"))
        plot = widgets.Output()
        parts.append(plot)
        display(widgets.VBox(parts))
        with plot:
            display(self.figure())


def show_report(path: str | Path) -> ReportView:
    """Opens a hang report (its directory, or hang-report.json): shown when it ends a cell."""
    found, report = read_report(Path(path))
    return ReportView(report, found)
