"""Where the notebook renderers draw: a widget frontend, or plain text.

The widgets need a kernel with a comm channel to a frontend; a plain `python` process, a
terminal IPython, or a notebook run headless (HANGKIT_NONINTERACTIVE set, as nbval and CI do)
gets text instead of widget reprs nobody will see.
"""

from __future__ import annotations

import os

from hangkit.records import RankState

NONINTERACTIVE_VARIABLE = "HANGKIT_NONINTERACTIVE"

# The doctor's probe statuses, shared by the probe matrix (ipywidgets) and the heatmap
# (matplotlib) so the two read alike; kept here because neither should import the other's
# library. "error" is not a ProbeResult status today; it is kept for a probe runner that fails.
PROBE_COLOURS = {
    "ok": "#2e7d32",  # green
    "warn": "#f9a825",  # amber
    "fail": "#d32f2f",  # red
    "timeout": "#7f0000",  # dark red: failed by running out of time, often the hang itself
    "skipped": "#9e9e9e",  # grey
    "error": "#7b1fa2",  # purple
}
PROBE_TEXT_COLOURS = {"warn": "black", "skipped": "black"}  # the rest read best in white
# Each rank state's colour, shared by the dashboard's rows and the report view's plot.
STATE_COLOURS = {
    RankState.RUNNING: "#2e7d32",  # green
    RankState.BUSY: "#00838f",  # teal: no beat for a while, but its stack keeps moving
    RankState.IDLE: "#78909c",  # grey-blue: an engine between cells, not working by intent
    RankState.WAITING: "#f9a825",  # amber: stopped inside a collective, waiting for its peers
    RankState.SLOW: "#ef6c00",  # orange: a straggler
    RankState.STALLED: "#c62828",  # red: stopped outside any collective, where hangs start
    RankState.SILENT: "#ad1457",  # crimson: no beat, its process alive (a GIL-held C call?)
    RankState.UNREACHABLE: "#9e9e9e",  # grey: its node's relay went silent, state unknown
    RankState.DEAD: "#424242",  # near black
    RankState.ERRORED: "#6a1b9a",  # purple
    RankState.FINISHED: "#1565c0",  # blue
}


def has_frontend() -> bool:
    """True inside an IPython kernel that can open comms; False when HANGKIT_NONINTERACTIVE is
    set (to anything but "" or "0"), outside IPython, or in a terminal IPython."""
    if os.environ.get(NONINTERACTIVE_VARIABLE, "") not in ("", "0"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    # Only a kernel has a `kernel` attribute; a terminal IPython has no comms to draw widgets.
    return shell is not None and getattr(shell, "kernel", None) is not None


def register_figure_png() -> None:
    """Lets a bare matplotlib Figure show as a PNG when it ends a notebook cell.

    matplotlib-inline registers that formatter only once pyplot loads its backend; hangkit's
    plots never touch pyplot, so without this a fresh kernel prints "<Figure size ...>". An
    existing formatter (the inline backend's, ipympl's choice) is left alone.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    png = shell.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        png.for_type(Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight"))
