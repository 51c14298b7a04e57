"""The live dashboard: one row per rank, its DataLoader workers, stall events, errors, and the
merged stacks on demand. Stock ipywidgets only, and a pure function of RankStatus records:
every value it shows is worded by dashboard_format, which its text mode prints too.

    dash = Dashboard(total_steps=1000, on_capture=cluster.stacks)
    dash.show()
    dash.update(monitor.statuses(), detector.step(now))   # as often as you like

Updates are throttled (at most one render per `min_interval`, the latest data wins) and each
rank's widgets are built once and then changed in place, so 64 ranks at 1 Hz cost little in
the kernel and in the browser. Without a widget frontend, show() prints text instead.
"""

from __future__ import annotations

import html
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import ipywidgets as widgets
from IPython.display import display

from hangkit.jupyter.dashboard_format import (
    RowText,
    by_rank,
    count_text,
    error_texts,
    event_lines,
    format_duration,
    header_counts,
    rank_key,
    ranks_title,
    render_text,
    row_text,
    state_of,
    steps_total,
)
from hangkit.jupyter.display import STATE_COLOURS, has_frontend
from hangkit.jupyter.tree_view import tree_html
from hangkit.records import Diagnosis, RankState, RankStatus, StallEvent, TreeNode

log = logging.getLogger(__name__)

COLOURS = STATE_COLOURS  # one colour per state, shared with the report view
TEXT_COLOURS = {RankState.WAITING: "black"}  # white on the others; amber is too light for it
BAR_STYLES = {
    RankState.RUNNING: "success", RankState.BUSY: "info", RankState.IDLE: "",
    RankState.FINISHED: "info",
    RankState.WAITING: "warning", RankState.SLOW: "warning",
    RankState.STALLED: "danger", RankState.DEAD: "danger", RankState.ERRORED: "danger",
    RankState.SILENT: "danger", RankState.UNREACHABLE: "",
}

_EVENTS_KEPT = 200


def _set(obj, name: str, value) -> None:
    # traitlets validates even an unchanged value; comparing first keeps 64 rows at 1 Hz cheap.
    if getattr(obj, name) != value:
        setattr(obj, name, value)


def _worker_digest(status: RankStatus) -> tuple:
    # Workers flip between idle and fetching on every batch; only their pids and their ends
    # (exited, killed by a signal) are news in text mode.
    return tuple((w.pid, "alive" if w.state.alive else w.state) for w in status.workers)


def _pre(lines: Iterable[str]) -> str:
    return "<pre style='margin:0'>" + html.escape("\n".join(lines)) + "</pre>"


# Columns share Layout objects: one model each instead of one per rank.
def _width(px: int) -> widgets.Layout:
    return widgets.Layout(width=f"{px}px", min_width=f"{px}px")


class _Row:
    """One rank's widgets, built once; render() only changes their values."""

    def __init__(self, layouts: dict[str, widgets.Layout]):
        self.key = widgets.Label(layout=layouts["key"])
        self.bar = widgets.IntProgress(value=0, min=0, max=1, layout=layouts["bar"])
        self.step = widgets.Label(layout=layouts["step"])
        self.state = widgets.Label(layout=layouts["state"],
                                   style={"font_weight": "bold", "text_color": "white"})
        self.phase = widgets.Label(layout=layouts["phase"])
        self.phase_time = widgets.Label(layout=layouts["time"])
        self.beat = widgets.Label(layout=layouts["beat"])
        self.collective = widgets.Label(layout=layouts["collective"])
        self.workers = widgets.HTML(layout=widgets.Layout(display="none", margin="0 0 0 80px"))
        self.box = widgets.VBox([
            widgets.HBox([self.key, self.bar, self.step, self.state, self.phase,
                          self.phase_time, self.beat, self.collective]),
            self.workers,
        ])

    def render(self, row: RowText) -> None:
        _set(self.key, "value", row.key)
        _set(self.key, "tooltip", row.tooltip)
        _set(self.bar, "max", row.bar_max)
        _set(self.bar, "value", row.bar_value)
        _set(self.bar, "bar_style", BAR_STYLES[row.state])
        _set(self.step, "value", row.step)
        _set(self.state, "value", row.state.value)  # a plain str: a Label would keep the enum
        _set(self.state.style, "background", COLOURS[row.state])
        _set(self.state.style, "text_color", TEXT_COLOURS.get(row.state, "white"))
        _set(self.phase, "value", row.phase)
        _set(self.phase_time, "value", row.phase_time)
        _set(self.beat, "value", row.beat)
        _set(self.collective, "value", row.collective)
        _set(self.workers, "value", _pre(row.workers) if row.workers else "")
        _set(self.workers.layout, "display", None if row.workers else "none")


class Dashboard:
    """Per-rank progress, DataLoader workers, stall events, errors and merged stacks.

    `on_capture()` is called by the "Capture stacks" button (EngineCluster.stacks, say); it
    returns (tree or None, diagnoses), which the dashboard shows. `clock` paces the
    throttling (inject a fake one in tests).
    """

    def __init__(self, total_steps: int | None = None, *, min_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_capture: Callable[[], tuple[TreeNode | None, list[Diagnosis]]] | None = None):
        self.total_steps = total_steps
        self.min_interval = min_interval
        self.clock = clock
        self.on_capture = on_capture
        self.statuses: list[RankStatus] = []
        self.events: deque[StallEvent] = deque(maxlen=_EVENTS_KEPT)
        self.errors: dict[str, str] = {}  # from show_error: full tracebacks, by rank key
        self.tree: TreeNode | None = None
        self.diagnoses: list[Diagnosis] = []
        self.stacks_note = ""
        self._event_keys: set[tuple] = set()
        self._events_seen = 0
        self._stacks_shown = 0
        self._shown_keys: tuple[str, ...] = ()
        self._pending = False
        self._rendered_at: float | None = None
        self._text_mode = False
        self._printed: tuple | None = None

        self._layouts = {name: _width(px) for name, px in (
            ("key", 70), ("bar", 160), ("step", 90), ("state", 70), ("phase", 90),
            ("time", 70), ("beat", 100))}
        self._layouts["collective"] = widgets.Layout(min_width="220px")
        self.rows: dict[str, _Row] = {}
        self._header = widgets.HTML()
        self._rows_box = widgets.VBox()
        self._events = widgets.HTML()
        self._errors = widgets.HTML()
        self._stacks_note = widgets.Label()
        self._tree = widgets.HTML(layout=widgets.Layout(flex="3 1 0", overflow="auto"))
        self._diagnoses = widgets.HTML(layout=widgets.Layout(flex="2 1 0"))
        self.capture_button = widgets.Button(
            description="Capture stacks", icon="camera", disabled=on_capture is None,
            tooltip="ask every rank for its stacks, merge and diagnose them")
        self.capture_button.on_click(lambda _button: self.capture())
        self.widget = widgets.VBox([
            self._header,
            self._rows_box,
            widgets.HTML("<b>Stall events</b> (latest first)"),
            self._events,
            widgets.HTML("<b>Errors</b>"),
            self._errors,
            widgets.HBox([self.capture_button, self._stacks_note]),
            widgets.HBox([self._tree, self._diagnoses]),
        ])
        self.widget.add_class("hangkit-dashboard")  # for browser tests and styling
        self._render_events()
        self._render_errors()
        self._render_stacks()
        self._render_header()

    # -- feeding it ------------------------------------------------------------------------

    def update(self, statuses: Sequence[RankStatus], events: Iterable[StallEvent] = (), *,
               now: float | None = None) -> bool:
        """Takes the latest statuses (and new stall events); renders if `min_interval` has
        passed since the last render, else keeps them for the next one. True if it rendered.

        Events are collected on every call, so none is lost to throttling; an event passed
        again (same kind, time and summary) is shown once. `now` must read the same clock as
        `clock` (flush() reads that). Held data shows at the next update or flush(): call
        update() on a schedule (1 Hz) and flush() when the feed stops.
        """
        self.statuses = list(statuses)
        for e in events:
            key = (e.kind, e.at, e.summary)
            if key not in self._event_keys:
                self._event_keys.add(key)
                self.events.append(e)
                self._events_seen += 1
        self._pending = True
        now = self.clock() if now is None else now
        if self._rendered_at is not None and now - self._rendered_at < self.min_interval:
            return False
        self._render(now)
        return True

    def flush(self) -> bool:
        """Renders what update() held back, now. True if there was anything."""
        if not self._pending:
            return False
        self._render(self.clock())
        return True

    def show_error(self, rank: int | str, text: str) -> None:
        """Shows a rank's traceback (or any error text) in the errors area."""
        self.errors[rank_key(rank)] = text
        self._render_errors()
        self._print_if_changed()

    def show_stacks(self, tree: TreeNode | None, diagnoses: Sequence[Diagnosis] = (),
                    note: str = "") -> None:
        """Shows a merged stack tree (rank sets per node) and the diagnoses beside it."""
        self.tree, self.diagnoses, self.stacks_note = tree, list(diagnoses), note
        self._stacks_shown += 1
        self._render_stacks()
        self._print_if_changed()

    def capture(self) -> tuple[TreeNode | None, list[Diagnosis]] | None:
        """What the button does: on_capture(), then show_stacks() with its result. A failure
        is shown, not raised, since a button's callback has nowhere to raise to."""
        if self.on_capture is None:
            return None
        self.capture_button.disabled = True
        self.capture_button.description = "Capturing..."
        started = self.clock()
        try:
            tree, diagnoses = self.on_capture()
        except Exception as e:
            log.warning("stack capture failed", exc_info=True)
            self.show_stacks(None, [], note=f"capture failed: {type(e).__name__}: {e}")
            return None
        finally:
            self.capture_button.disabled = False
            self.capture_button.description = "Capture stacks"
        self.show_stacks(tree, diagnoses,
                         note=f"captured in {format_duration(self.clock() - started)}")
        return tree, list(diagnoses)

    # -- showing it ------------------------------------------------------------------------

    def show(self) -> None:
        """Displays the widget, or, without a widget frontend, prints text() now and again
        whenever a rank's state, a worker, an event, an error or the stacks change."""
        if has_frontend():
            display(self.widget)
        else:
            self._text_mode = True
            self._printed = None
            self._print_if_changed()

    def _ipython_display_(self) -> None:
        self.show()

    def text(self) -> str:
        """Everything the widget shows, as plain text."""
        return render_text(self.statuses, self._total(), events=self.events, errors=self.errors,
                           tree=self.tree, diagnoses=self.diagnoses, note=self.stacks_note)

    # -- rendering -------------------------------------------------------------------------

    def _render(self, now: float) -> None:
        self._pending = False
        self._rendered_at = now
        total = self._total()
        for s in self.statuses:
            row = self.rows.get(s.key)
            if row is None:
                row = self.rows[s.key] = _Row(self._layouts)
            row.render(row_text(s, total))
        # A rank's row is kept once built; only the ranks in the latest statuses are shown.
        keys = tuple(s.key for s in by_rank(self.statuses))
        if keys != self._shown_keys:
            self._shown_keys = keys
            self._rows_box.children = tuple(self.rows[k].box for k in keys)
        self._render_header()
        self._render_events()
        self._render_errors()
        self._print_if_changed()

    def _total(self) -> int:
        return steps_total(self.statuses, self.total_steps)

    def _render_header(self) -> None:
        parts = [f"<b>{ranks_title(len(self.statuses))}</b>"]
        parts += [f"<span style='background:{COLOURS[state]};"
                  f"color:{TEXT_COLOURS.get(state, 'white')};padding:0 4px'>"
                  f"{count_text(state, c)}</span>"
                  for state, c in header_counts(self.statuses)]
        _set(self._header, "value", " ".join(parts))

    def _render_events(self) -> None:
        lines = event_lines(self.events)
        _set(self._events, "value", _pre(lines) if lines else "<i>none</i>")

    def _error_texts(self) -> dict[str, str]:
        return error_texts(self.statuses, self.errors)

    def _render_errors(self) -> None:
        texts = self._error_texts()
        value = "".join(f"<b>{html.escape(key)}</b>{_pre([text.rstrip()])}"
                        for key, text in texts.items())
        _set(self._errors, "value", value or "<i>none</i>")

    def _render_stacks(self) -> None:
        _set(self._stacks_note, "value", self.stacks_note)
        has_tree = self.tree is not None and bool(self.tree.children)
        _set(self._tree, "value", tree_html(self.tree) if has_tree else
             ("<i>no stacks</i>" if self.tree is not None or self.stacks_note else ""))
        _set(self._diagnoses, "value", "".join(
            f"<p><b>[{html.escape(d.kind)}]</b> {html.escape(d.summary)}<br>"
            f"<i>advice:</i> {html.escape(d.advice)}</p>" for d in self.diagnoses))

    def _digest(self) -> tuple:
        """What counts as a change worth printing in text mode: not the clocks and steps that
        move every second, but states, workers, events, errors and stacks."""
        return (
            tuple((s.key, state_of(s), _worker_digest(s)) for s in self.statuses),
            self._events_seen, tuple(self._error_texts().items()), self._stacks_shown,
        )

    def _print_if_changed(self) -> None:
        if not self._text_mode:
            return
        digest = self._digest()
        if digest != self._printed:
            self._printed = digest
            print(self.text(), flush=True)
