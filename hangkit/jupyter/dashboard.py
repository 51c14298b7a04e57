"""The live dashboard: one row per rank, its DataLoader workers, stall events, errors, and the
merged stacks on demand. Stock ipywidgets only, and a pure function of RankStatus records.

    dash = Dashboard(total_steps=1000, on_capture=cluster.capture_stacks)
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

from hangkit.jupyter.display import has_frontend
from hangkit.monitor.merge import render_tree
from hangkit.monitor.report import render_workers
from hangkit.records import Diagnosis, RankStatus, StallEvent, TreeNode

log = logging.getLogger(__name__)

STATES = ("running", "idle", "waiting", "slow", "stalled", "dead", "errored", "finished")
COLOURS = {
    "running": "#2e7d32",  # green
    "idle": "#78909c",  # grey-blue: an engine between cells, not working by intent
    "waiting": "#f9a825",  # amber: stopped inside a collective, waiting for its peers
    "slow": "#ef6c00",  # orange: a straggler
    "stalled": "#c62828",  # red: stopped outside any collective, where a hang usually starts
    "dead": "#424242",  # near black
    "errored": "#6a1b9a",  # purple
    "finished": "#1565c0",  # blue
}
TEXT_COLOURS = {"waiting": "black"}  # white on the others
BAR_STYLES = {
    "running": "success", "idle": "", "finished": "info", "waiting": "warning", "slow": "warning",
    "stalled": "danger", "dead": "danger", "errored": "danger",
}

EVENTS_SHOWN = 20
_ALIVE = ("starting", "idle", "fetching")
_EVENTS_KEPT = 200


def state_of(status: RankStatus) -> str:
    """The dashboard's state for a rank: the monitor's status, with an error taking precedence
    over "finished"; a status this version does not know reads as errored or running."""
    if status.status in COLOURS:
        return "errored" if status.status == "finished" and status.error else status.status
    return "errored" if status.error else "running"


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 100:
        return f"{x:.1f} s"
    if x < 3600:
        return f"{int(x) // 60}m{int(x) % 60:02d}s"
    return f"{int(x) // 3600}h{int(x) % 3600 // 60:02d}m"


def _collective(status: RankStatus) -> str:
    c = status.collective
    if c is None:
        return ""
    return f"{c.describe()} (inside {_seconds(c.seconds)})" if c.inside \
        else f"{c.describe()} (not inside)"


def _order(status: RankStatus) -> tuple:
    return (status.rank is None, status.rank if status.rank is not None else status.pid)


def _key(rank: int | str) -> str:
    return rank if isinstance(rank, str) else f"rank {rank}"


def _key_order(key: str) -> tuple:
    # "rank 2" before "rank 10", and both before "pid 1234"
    kind, _, number = key.partition(" ")
    return (kind != "rank", int(number) if number.isdigit() else 0, key)


def _set(obj, name: str, value) -> None:
    # traitlets validates even an unchanged value; comparing first keeps 64 rows at 1 Hz cheap.
    if getattr(obj, name) != value:
        setattr(obj, name, value)


def _worker_digest(status: RankStatus) -> tuple:
    # Workers flip between idle and fetching on every batch; only their pids and any other
    # state (exited, killed by a signal) are news in text mode.
    workers = status.extra.get("dataloader_workers")
    if not isinstance(workers, list):
        return ()
    return tuple((w.get("pid"), w.get("state") if w.get("state") not in _ALIVE else "alive")
                 for w in workers if isinstance(w, dict))


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

    def render(self, status: RankStatus, state: str, total: int) -> None:
        _set(self.key, "value", status.key)
        _set(self.key, "tooltip", f"pid {status.pid} on {status.host}")
        step = status.step if status.step is not None else 0
        _set(self.bar, "max", max(total, 1))
        _set(self.bar, "value", min(max(step, 0), self.bar.max))
        _set(self.bar, "bar_style", BAR_STYLES[state])
        _set(self.step, "value", "-" if status.step is None else f"{status.step}/{total}")
        _set(self.state, "value", state)
        _set(self.state.style, "background", COLOURS[state])
        _set(self.state.style, "text_color", TEXT_COLOURS.get(state, "white"))
        _set(self.phase, "value", status.phase or "")
        _set(self.phase_time, "value", _seconds(status.phase_seconds) if status.phase else "")
        _set(self.beat, "value", f"beat {_seconds(status.beat_age)} ago")
        _set(self.collective, "value", _collective(status))
        lines = render_workers(status.extra.get("dataloader_workers"))
        _set(self.workers, "value", _pre(lines) if lines else "")
        _set(self.workers.layout, "display", None if lines else "none")


class Dashboard:
    """Per-rank progress, DataLoader workers, stall events, errors and merged stacks.

    `on_capture()` is called by the "Capture stacks" button; it returns (tree or None,
    diagnoses), which the dashboard shows. `clock` paces the throttling (inject a fake one
    in tests).
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
        self.errors[_key(rank)] = text
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
                         note=f"captured in {_seconds(self.clock() - started)}")
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
        lines = [self._header_text()]
        total = self._total()
        for s in sorted(self.statuses, key=_order):
            lines.append(self._rank_line(s, total))
            lines += ["    " + w for w in render_workers(s.extra.get("dataloader_workers"))]
        if self.events:
            lines += ["Events (latest first):"] + ["  " + t for t in self._event_lines()]
        errors = self._error_texts()
        if errors:
            lines.append("Errors:")
            for key, text in errors.items():
                lines.append(f"  {key}:")
                lines += ["    " + t for t in text.rstrip().splitlines()]
        if self.tree is not None or self.diagnoses or self.stacks_note:
            lines.append("Stacks" + (f" ({self.stacks_note})" if self.stacks_note else "") + ":")
            lines += ["  " + t for t in (render_tree(self.tree) if self.tree else [])]
            if self.diagnoses:
                lines.append("Diagnosis:")
                for d in self.diagnoses:
                    lines += [f"  [{d.kind}] {d.summary}", f"      advice: {d.advice}"]
        return "\n".join(lines)

    # -- rendering -------------------------------------------------------------------------

    def _render(self, now: float) -> None:
        self._pending = False
        self._rendered_at = now
        total = self._total()
        for s in self.statuses:
            row = self.rows.get(s.key)
            if row is None:
                row = self.rows[s.key] = _Row(self._layouts)
            row.render(s, state_of(s), total)
        # A rank's row is kept once built; only the ranks in the latest statuses are shown.
        keys = tuple(s.key for s in sorted(self.statuses, key=_order))
        if keys != self._shown_keys:
            self._shown_keys = keys
            self._rows_box.children = tuple(self.rows[k].box for k in keys)
        self._render_header()
        self._render_events()
        self._render_errors()
        self._print_if_changed()

    def _total(self) -> int:
        # Without a known total the bars compare ranks against the one furthest ahead.
        if self.total_steps:
            return self.total_steps
        return max((s.step for s in self.statuses if s.step is not None), default=0)

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.statuses:
            state = state_of(s)
            counts[state] = counts.get(state, 0) + 1
        return {state: counts[state] for state in STATES if state in counts}

    def _header_text(self) -> str:
        n = len(self.statuses)
        counts = ", ".join(f"{c} {state}" for state, c in self._counts().items())
        return f"{n} rank{'' if n == 1 else 's'}" + (f": {counts}" if counts else "")

    def _render_header(self) -> None:
        parts = [f"<b>{len(self.statuses)} rank{'' if len(self.statuses) == 1 else 's'}</b>"]
        parts += [f"<span style='background:{COLOURS[state]};"
                  f"color:{TEXT_COLOURS.get(state, 'white')};padding:0 4px'>{c} {state}</span>"
                  for state, c in self._counts().items()]
        _set(self._header, "value", " ".join(parts))

    def _rank_line(self, s: RankStatus, total: int) -> str:
        parts = [f"{s.key}: {state_of(s)}",
                 "no step" if s.step is None else f"step {s.step}/{total}"]
        if s.phase:
            parts.append(f"phase {s.phase} for {_seconds(s.phase_seconds)}")
        parts.append(f"beat {_seconds(s.beat_age)} ago")
        if s.collective is not None:
            parts.append(_collective(s))
        if s.error:
            parts.append(f"error: {s.error}")
        return ", ".join(parts) + f" (pid {s.pid} on {s.host})"

    def _event_lines(self) -> list[str]:
        shown = list(self.events)[-EVENTS_SHOWN:][::-1]
        return [f"[{e.kind}] {e.summary}"
                + (f" ({e.case})" if e.case and e.case not in e.summary else "")
                for e in shown]

    def _render_events(self) -> None:
        lines = self._event_lines()
        _set(self._events, "value", _pre(lines) if lines else "<i>none</i>")

    def _error_texts(self) -> dict[str, str]:
        # A full traceback from show_error() wins over the last line a rank's beat carried.
        texts = {s.key: s.error for s in self.statuses if s.error}
        texts.update(self.errors)
        return {key: texts[key] for key in sorted(texts, key=_key_order)}

    def _render_errors(self) -> None:
        texts = self._error_texts()
        value = "".join(f"<b>{html.escape(key)}</b>{_pre([text.rstrip()])}"
                        for key, text in texts.items())
        _set(self._errors, "value", value or "<i>none</i>")

    def _render_stacks(self) -> None:
        _set(self._stacks_note, "value", self.stacks_note)
        lines = render_tree(self.tree) if self.tree is not None else []
        _set(self._tree, "value", _pre(lines) if lines else
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
