"""The doctor's results as a grid of ranks by probes: a coloured button per cell; clicking one
shows that probe's detail and advice for that rank. A pure renderer of ProbeResult records.

    ProbeMatrix(results).show()
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import ipywidgets as widgets
from IPython.display import display

from hangkit.jupyter.display import PROBE_COLOURS, PROBE_TEXT_COLOURS, has_frontend
from hangkit.probes.report import CELL, render
from hangkit.records import ProbeResult

COLOURS = PROBE_COLOURS  # status -> colour, the same as the heatmap's
MISSING_COLOUR = "#ffffff"  # a probe that left no result for a rank


def rank_label(rank: int | None) -> str:
    # rank None: the doctor ran without --ranks, so the row is this node's own environment
    return "this node" if rank is None else f"rank {rank}"


class ProbeMatrix:
    """`.widget`: rows are ranks, columns probes; `.cells[(name, rank)]` is a cell's Button;
    `.select(name, rank)` does what clicking it does; `.text()` is the doctor's table."""

    def __init__(self, results: Sequence[ProbeResult]):
        self.results = list(results)
        self.names = list(dict.fromkeys(r.name for r in self.results))
        self.ranks = sorted({r.rank for r in self.results},
                            key=lambda k: (k is not None, -1 if k is None else k))
        self.by_cell = {(r.name, r.rank): r for r in self.results}
        self.cells: dict[tuple[str, int | None], widgets.Button] = {}
        self.selected: tuple[str, int | None] | None = None

        # One Layout and one style per status, shared by the cells: a 64 x 15 grid stays at a
        # few hundred widget models.
        cell_layout = widgets.Layout(width="auto", height="28px")
        styles = {status: widgets.ButtonStyle(button_color=colour, font_weight="bold",
                                              text_color=PROBE_TEXT_COLOURS.get(status, "white"))
                  for status, colour in COLOURS.items()}
        missing = widgets.ButtonStyle(button_color=MISSING_COLOUR)
        items: list[widgets.Widget] = [widgets.Label("")]
        items += [widgets.Label(n, tooltip=n, layout=widgets.Layout(overflow="hidden"))
                  for n in self.names]
        for rank in self.ranks:
            items.append(widgets.Label(rank_label(rank)))
            for name in self.names:
                r = self.by_cell.get((name, rank))
                if r is None:
                    button = widgets.Button(description="-", disabled=True, style=missing,
                                            layout=cell_layout, tooltip="no result")
                else:
                    button = widgets.Button(
                        description=CELL.get(r.status, r.status), layout=cell_layout,
                        style=styles.get(r.status, missing),
                        tooltip=f"{name} on {rank_label(rank)}: {r.status}")
                    button.on_click(self._clicked(name, rank))
                self.cells[(name, rank)] = button
                items.append(button)
        self.grid = widgets.GridBox(items, layout=widgets.Layout(
            grid_template_columns=f"max-content repeat({len(self.names)}, minmax(64px, 1fr))",
            grid_gap="2px 4px", align_items="center"))
        self.output = widgets.HTML("<i>click a cell for its detail and advice</i>")
        self.widget = widgets.VBox([self.grid, self.output])

    def _clicked(self, name: str, rank: int | None):
        return lambda _button: self.select(name, rank)

    def select(self, name: str, rank: int | None) -> ProbeResult | None:
        """Shows one probe's detail and advice for one rank in the output area."""
        self.selected = (name, rank)
        r = self.by_cell.get((name, rank))
        if r is None:
            self.output.value = (f"<b>{html.escape(name)}</b> on {rank_label(rank)}: "
                                 "no result")
            return None
        colour = COLOURS.get(r.status, MISSING_COLOUR)
        parts = [f"<b>{html.escape(name)}</b> on {rank_label(rank)}: "
                 f"<span style='color:{colour};font-weight:bold'>{html.escape(r.status)}</span>"
                 f" in {r.seconds:.1f} s",
                 f"<pre style='white-space:pre-wrap;margin:4px 0'>{html.escape(r.detail)}</pre>"]
        if r.advice:
            parts.append(f"<b>advice:</b> {html.escape(r.advice)}")
        self.output.value = "".join(parts)
        return r

    def text(self) -> str:
        """The doctor's own table and problems, as `hangkit doctor` prints them."""
        return "\n".join(render(self.results))

    def show(self) -> None:
        """Displays the grid, or prints text() where no widget frontend is present."""
        if has_frontend():
            display(self.widget)
        else:
            print(self.text(), flush=True)

    def _ipython_display_(self) -> None:
        self.show()
