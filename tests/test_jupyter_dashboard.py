"""The notebook widgets: the dashboard and the probe matrix, fed records built by hand.

No kernel is needed: ipywidgets builds its models without a frontend, and the tests read the
widgets' values, which are what a frontend would draw.
"""

from __future__ import annotations

import dataclasses
import html
import subprocess
import sys

import pytest

pytest.importorskip("ipywidgets")

import ipywidgets  # noqa: E402

from hangkit.jupyter import display as display_module  # noqa: E402
from hangkit.jupyter.dashboard import BAR_STYLES, COLOURS, Dashboard  # noqa: E402
from hangkit.jupyter.dashboard_format import (  # noqa: E402
    EVENTS_SHOWN,
    STATES,
    RowText,
    format_duration,
    row_text,
    state_of,
)
from hangkit.jupyter.probe_matrix import COLOURS as PROBE_COLOURS  # noqa: E402
from hangkit.jupyter.probe_matrix import MISSING_COLOUR, ProbeMatrix  # noqa: E402
from hangkit.probes.report import render  # noqa: E402
from hangkit.records import (  # noqa: E402
    CollectiveState,
    Diagnosis,
    Frame,
    ProbeResult,
    RankState,
    RankStatus,
    StallEvent,
    TreeNode,
    WorkerState,
)

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def status(rank: int, state: str = "running", **kw) -> RankStatus:
    kw.setdefault("step", 10)
    kw.setdefault("phase", "forward")
    return RankStatus(key=f"rank {rank}", rank=rank, pid=1000 + rank, host="node1",
                      status=state, **kw)


def widget_count() -> int:
    # Widget.widgets is deprecated in ipywidgets 8; this is the registry it returned.
    from ipywidgets.widgets import widget

    return len(widget._instances)


# -- states and colours ----------------------------------------------------------------------

def test_every_state_has_its_own_colour_and_bar_style():
    assert set(COLOURS) == set(STATES) == {
        "running", "busy", "idle", "waiting", "slow", "stalled", "silent", "unreachable", "dead",
        "errored", "finished"}
    assert len(set(COLOURS.values())) == len(COLOURS)
    assert all(c.startswith("#") and len(c) == 7 for c in COLOURS.values())
    assert set(BAR_STYLES) == set(STATES)
    assert BAR_STYLES["running"] == "success" and BAR_STYLES["stalled"] == "danger"


@pytest.mark.parametrize("state", STATES)
def test_state_of_takes_the_monitors_status(state):
    assert state_of(status(0, state)) == state


def test_state_of_puts_an_error_before_finished_and_reads_unknown_statuses():
    assert state_of(status(0, "finished", error="ValueError: bad")) == RankState.ERRORED
    assert state_of(status(0, "finished")) == RankState.FINISHED
    # The record reads a status this version does not know as running, error or not: the
    # error still shows, in the row's text and the errors area.
    assert state_of(status(0, "sleeping")) == RankState.RUNNING
    assert state_of(status(0, "sleeping", error="boom")) == RankState.RUNNING


def test_durations_read_as_seconds_minutes_or_hours():
    assert [format_duration(x) for x in (None, 0.25, 99.9, 130, 3599, 3600, 11100)] == [
        "-", "0.2 s", "99.9 s", "2m10s", "59m59s", "1h00m", "3h05m"]


# -- rows ------------------------------------------------------------------------------------

def test_one_row_per_rank_with_bar_state_and_labels():
    dash = Dashboard(total_steps=100)
    coll = CollectiveState("torch", "world", "all_reduce", 7, inside=True, seconds=2.5)
    done = CollectiveState("mpi", "0,1", "Barrier", 3, inside=False)
    assert dash.update([
        status(0, "running", step=42, phase="backward", phase_seconds=0.3, beat_age=0.4,
               collective=done),
        status(1, "waiting", step=41, phase="sync", phase_seconds=12.0, beat_age=0.5,
               collective=coll),
        status(2, "stalled", step=250, phase="data", phase_seconds=130.0, beat_age=3.0),
    ], now=0.0)
    assert len(dash.rows) == 3
    assert len(dash._rows_box.children) == 3
    r0, r1, r2 = (dash.rows[f"rank {r}"] for r in range(3))
    assert r0.key.value == "rank 0" and r0.key.tooltip == "pid 1000 on node1"
    assert (r0.bar.value, r0.bar.max, r0.bar.bar_style) == (42, 100, "success")
    assert r0.step.value == "42/100"
    assert r0.state.value == "running"
    assert r0.state.style.background == COLOURS["running"]
    assert (r0.phase.value, r0.phase_time.value, r0.beat.value) == (
        "backward", "0.3 s", "beat 0.4 s ago")
    assert r0.collective.value == "Barrier #3 on 0,1 (not inside)"
    assert (r1.state.value, r1.bar.bar_style) == ("waiting", "warning")
    assert r1.state.style.background == COLOURS["waiting"]
    assert r1.collective.value == "all_reduce #7 (inside 2.5 s)"
    assert r1.phase_time.value == "12.0 s"
    # A step past the total fills the bar rather than failing validation.
    assert (r2.bar.value, r2.bar.bar_style) == (100, "danger")
    assert r2.state.style.background == COLOURS["stalled"]
    assert r2.phase_time.value == "2m10s"
    assert r2.collective.value == ""
    header = dash._header.value
    assert "3 ranks" in header and "1 running" in header and "1 stalled" in header


def test_rows_follow_rank_order_and_show_only_current_ranks():
    dash = Dashboard(total_steps=10)
    dash.update([status(2), status(0)], now=0)
    assert [b.children[0].children[0].value for b in dash._rows_box.children] == [
        "rank 0", "rank 2"]
    dash.update([status(1), status(2), status(0)], now=5)
    assert [b.children[0].children[0].value for b in dash._rows_box.children] == [
        "rank 0", "rank 1", "rank 2"]
    kept = dash.rows["rank 1"]
    dash.update([status(0), status(2)], now=10)
    assert len(dash._rows_box.children) == 2
    dash.update([status(0), status(1), status(2)], now=15)
    assert dash.rows["rank 1"] is kept


def test_without_total_steps_bars_compare_ranks_to_the_one_ahead():
    dash = Dashboard()
    dash.update([status(0, step=50), status(1, step=25), status(2, step=None)], now=0)
    assert [dash.rows[f"rank {r}"].bar.max for r in range(3)] == [50, 50, 50]
    assert [dash.rows[f"rank {r}"].bar.value for r in range(3)] == [50, 25, 0]
    assert dash.rows["rank 2"].step.value == "-"


def test_a_state_change_changes_colour_and_bar_style_in_place():
    dash = Dashboard(total_steps=10)
    dash.update([status(0, "running")], now=0)
    row = dash.rows["rank 0"]
    dash.update([status(0, "dead")], now=2)
    assert dash.rows["rank 0"] is row
    assert row.state.value == "dead"
    assert row.state.style.background == COLOURS["dead"]
    assert row.bar.bar_style == "danger"


# -- DataLoader workers ----------------------------------------------------------------------

WORKERS = [
    WorkerState(0, 501, "idle"),
    WorkerState(1, 502, "fetching", index=17, since=1.0, seconds=33.0),
    WorkerState(2, 503, "killed", signal=9),
]


def test_workers_are_listed_under_their_rank():
    dash = Dashboard(total_steps=10)
    dash.update([status(0, workers=WORKERS), status(1)], now=0)
    shown = dash.rows["rank 0"].workers
    assert shown.layout.display is None
    assert "DataLoader worker 0 (pid 501) idle" in shown.value
    assert "DataLoader worker 1 (pid 502) fetching dataset index 17 for 33.0 s" in shown.value
    assert "DataLoader worker 2 (pid 503) killed by signal 9 (SIGKILL)" in shown.value
    assert dash.rows["rank 1"].workers.layout.display == "none"
    text = dash.text()
    assert "    DataLoader worker 1 (pid 502) fetching dataset index 17 for 33.0 s" in text
    # A rank whose workers went away hides its section again.
    dash.update([status(0), status(1)], now=5)
    assert dash.rows["rank 0"].workers.layout.display == "none"


def test_an_old_reports_untyped_workers_show_as_typed_ones():
    # hangkit 0.1.0 carried a rank's workers as free-text dicts in its status's extra.
    old = {"key": "rank 0", "rank": 0, "pid": 1000, "host": "node1", "status": "running",
           "step": 3, "extra": {"dataloader_workers": [
               {"worker": 2, "pid": 503, "state": "killed by signal 9", "signal": 9}]}}
    dash = Dashboard(total_steps=10)
    dash.update([RankStatus.from_json(old)], now=0)
    line = "DataLoader worker 2 (pid 503) killed by signal 9 (SIGKILL)"
    assert line in dash.rows["rank 0"].workers.value
    assert "    " + line in dash.text()


def test_worker_deaths_are_news_in_text_mode_but_busy_workers_are_not():
    dash = Dashboard(total_steps=10)
    fetching = WorkerState(0, 501, "fetching", index=3, since=1.0, seconds=0.1)
    dash.statuses = [status(0, workers=[WorkerState(0, 501, "idle")])]
    idle = dash._digest()
    dash.statuses = [status(0, workers=[fetching])]
    assert dash._digest() == idle
    dash.statuses = [status(0, workers=[WorkerState(0, 501, "killed", signal=9)])]
    assert dash._digest() != idle


# -- throttling ------------------------------------------------------------------------------

def test_updates_coalesce_and_the_latest_data_wins():
    clock = FakeClock(100.0)
    dash = Dashboard(total_steps=100, min_interval=1.0, clock=clock)
    assert dash.update([status(0, step=1)]) is True
    clock.t = 100.3
    assert dash.update([status(0, step=2)]) is False
    clock.t = 100.6
    assert dash.update([status(0, step=3)], [StallEvent("stall", "no rank advanced", [0])]) \
        is False
    assert dash.rows["rank 0"].bar.value == 1  # still the first render
    assert "no rank advanced" not in dash._events.value
    assert dash.flush() is True
    assert dash.rows["rank 0"].bar.value == 3
    assert "no rank advanced" in dash._events.value  # an event is not lost to throttling
    assert dash.flush() is False  # nothing pending
    clock.t = 101.0
    assert dash.update([status(0, step=4)]) is False  # 0.4 s after the flush
    clock.t = 101.7
    assert dash.update([status(0, step=5)]) is True
    assert dash.rows["rank 0"].bar.value == 5


def test_now_overrides_the_clock():
    dash = Dashboard(min_interval=2.0, clock=lambda: pytest.fail("clock read"))
    assert dash.update([status(0)], now=10.0)
    assert not dash.update([status(0)], now=11.9)
    assert dash.update([status(0)], now=12.0)


def test_64_ranks_at_1_hz_reuse_their_widgets():
    clock = FakeClock(0.0)
    dash = Dashboard(total_steps=1000, clock=clock)

    def statuses(i: int) -> list[RankStatus]:
        # Everything a row shows changes on every update: the worst case.
        return [status(r, STATES[(r + i) % 4], step=i, phase=("data", "forward")[i % 2],
                       phase_seconds=0.1 * i, beat_age=0.01 * i,
                       collective=CollectiveState("torch", "world", "all_reduce", i, i % 2 == 0,
                                                  0.2 * i),
                       workers=[WorkerState(0, 9000 + r, "fetching", index=i,
                                            seconds=0.1 * i)])
                for r in range(64)]

    batches = [statuses(i) for i in range(101)]
    dash.update(batches[0])
    boxes = [dash.rows[f"rank {r}"].box for r in range(64)]
    before = widget_count()
    for batch in batches[1:]:
        clock.t += 1.0
        assert dash.update(batch, [StallEvent("straggler", f"rank 3 slow at {clock.t}", [3],
                                              at=clock.t)])
    # What this costs is a benchmark's figure, not a test's: asserting a CPU time here would
    # fail on a loaded machine and say nothing about the widgets.
    assert widget_count() == before, "widgets were created after the first render"
    assert [dash.rows[f"rank {r}"].box for r in range(64)] == boxes
    assert dash.rows["rank 63"].bar.value == 100
    assert dash.rows["rank 63"].collective.value == "all_reduce #100 (inside 20.0 s)"


# -- events, errors, stacks ------------------------------------------------------------------

def test_events_show_latest_first_once_each_and_capped():
    dash = Dashboard(min_interval=0)
    first = StallEvent("desync", "ranks 0,1 in all_reduce #5, rank 2 in broadcast #5", [2],
                       at=1.0, case="TD-02")
    dash.update([status(0)], [first], now=0)
    dash.update([status(0)], [first], now=1)  # the same event passed again
    assert dash._events.value.count("all_reduce #5") == 1
    assert "[desync] ranks 0,1 in all_reduce #5, rank 2 in broadcast #5 (TD-02)" in \
        dash._events.value
    for i in range(EVENTS_SHOWN + 5):
        dash.update([status(0)], [StallEvent("stall", f"stall number {i}", at=10.0 + i)],
                    now=2 + i)
    value = dash._events.value
    last = EVENTS_SHOWN + 4
    assert value.index(f"stall number {last}") < value.index(f"stall number {last - 1}")
    assert "stall number 4" not in value and "all_reduce #5" not in value
    assert value.count("[stall]") == EVENTS_SHOWN
    assert "Events (latest first):\n  [stall] stall number 24" in dash.text()


def test_errors_show_each_ranks_traceback_escaped():
    dash = Dashboard(min_interval=0)
    dash.update([status(0), status(1, "errored", error="KeyError: 'x'")], now=0)
    assert "<b>rank 1</b>" in dash._errors.value and "KeyError: &#x27;x&#x27;" in \
        dash._errors.value
    traceback = 'Traceback (most recent call last):\n  File "<stdin>", line 1\nValueError: <bad>'
    dash.show_error(0, traceback)
    assert "&lt;stdin&gt;" in dash._errors.value and "ValueError: &lt;bad&gt;" in \
        dash._errors.value
    assert "<stdin>" not in dash._errors.value
    text = dash.text()
    assert "Errors:\n  rank 0:\n    Traceback (most recent call last):" in text
    assert "  rank 1:\n    KeyError: 'x'" in text
    assert "rank 1: errored" in text and "error: KeyError: 'x'" in text
    # A full traceback from show_error() replaces the beat's last line for that rank.
    dash.show_error(1, "Traceback ...\nKeyError: 'x'")
    assert "Traceback ...\n" in dash._errors.value


def tree() -> TreeNode:
    def node(function, line, ranks, *children):
        return TreeNode(Frame(function, "/home/u/train.py", line), list(ranks),
                        [1000 + r for r in ranks], list(children))

    main = node("<module>", 90, range(4),
                node("train", 40, range(4),
                     node("all_reduce", 12, [0, 1, 2]),
                     node("load_batch", 20, [3])))
    return TreeNode(None, list(range(4)), [1000 + r for r in range(4)], [main])


DIAGNOSES = [Diagnosis("TD-01", "ranks 0-2 wait in all_reduce; rank 3 is in load_batch",
                       "look at why rank 3 <never> arrives", [3], [1003])]


def test_stacks_show_the_merged_tree_with_rank_sets_and_the_diagnosis():
    dash = Dashboard()
    assert dash.capture_button.disabled  # nothing to call
    dash.show_stacks(tree(), DIAGNOSES, note="by hand")
    shown = dash._tree.value  # tree_view.tree_html: the odd class out (rank 3) first
    assert "[ranks 0-3]</b> &lt;module&gt; (" in shown
    assert shown.index("[rank 3]</b> load_batch") < shown.index("[ranks 0-2]</b> all_reduce")
    assert "[TD-01]" in dash._diagnoses.value and "&lt;never&gt;" in dash._diagnoses.value
    assert dash._stacks_note.value == "by hand"
    text = dash.text()
    assert "Stacks (by hand):" in text and "[rank 3] load_batch" in text
    assert "  [TD-01] ranks 0-2 wait in all_reduce; rank 3 is in load_batch" in text
    assert "      advice: look at why rank 3 <never> arrives" in text


def test_the_capture_button_calls_on_capture_and_shows_its_result():
    calls = []
    clock = FakeClock(5.0)

    def on_capture():
        calls.append(dash.capture_button.disabled)
        clock.t += 1.5
        return tree(), DIAGNOSES

    dash = Dashboard(clock=clock, on_capture=on_capture)
    assert not dash.capture_button.disabled
    dash.capture_button.click()
    assert calls == [True]  # disabled while it runs, so a second click cannot pile up
    assert not dash.capture_button.disabled
    assert "[ranks 0-2]</b> all_reduce" in dash._tree.value
    assert "TD-01" in dash._diagnoses.value
    assert dash._stacks_note.value == "captured in 1.5 s"


def test_a_failed_capture_is_shown_not_raised():
    def on_capture():
        raise TimeoutError("ranks 2,3 did not answer")

    dash = Dashboard(on_capture=on_capture)
    dash.capture_button.click()
    assert dash._stacks_note.value == "capture failed: TimeoutError: ranks 2,3 did not answer"
    assert dash.capture_button.description == "Capture stacks"
    assert not dash.capture_button.disabled


# -- text ------------------------------------------------------------------------------------

def test_text_has_a_line_per_rank():
    dash = Dashboard(total_steps=100)
    dash.update([
        status(0, step=42, phase="backward", phase_seconds=1.3, beat_age=0.5,
               collective=CollectiveState("torch", "world", "all_reduce", 7, True, 2.0)),
        RankStatus(key="pid 77", rank=None, pid=77, host="node2", status="dead"),
    ], now=0)
    lines = dash.text().splitlines()
    assert lines[0] == "2 ranks: 1 running, 1 dead"
    assert lines[1] == ("rank 0: running, step 42/100, phase backward for 1.3 s, "
                        "beat 0.5 s ago, all_reduce #7 (inside 2.0 s) (pid 1000 on node1)")
    assert lines[2] == "pid 77: dead, step -, beat 0.0 s ago (pid 77 on node2)"
    assert len(lines) == 3


def test_the_text_and_the_widgets_show_the_same_values_for_a_row():
    # One formatter behind both: every value of a row's RowText is in its widgets and in
    # its line of text (and its workers on the lines below), worded the same.
    s = status(1, "waiting", step=41, phase="sync", phase_seconds=130.0, beat_age=0.5,
               collective=CollectiveState("torch", "world", "all_reduce", 7, True, 2.5),
               error="RuntimeError: timed out", workers=WORKERS)
    dash = Dashboard(total_steps=100)
    dash.update([s], now=0)
    row, widgets = row_text(s, 100), dash.rows["rank 1"]
    shown = {
        "key": widgets.key.value, "tooltip": widgets.key.tooltip, "state": widgets.state.value,
        "bar_value": widgets.bar.value, "bar_max": widgets.bar.max, "step": widgets.step.value,
        "phase": widgets.phase.value, "phase_time": widgets.phase_time.value,
        "beat": widgets.beat.value, "collective": widgets.collective.value,
        "workers": widgets.workers.value, "error": dash._errors.value,
    }
    assert set(shown) == {f.name for f in dataclasses.fields(RowText)}
    text = dash.text().splitlines()
    line = next(t for t in text if t.startswith("rank 1: "))
    for name, widget_value in shown.items():
        value = getattr(row, name)
        if name == "workers":
            assert all(html.escape(w) in widget_value for w in value)
            assert all("    " + w in text for w in value)
        elif name == "error":
            assert html.escape(value) in widget_value and value in line
        elif name in ("bar_value", "bar_max"):  # the bar draws these; the text says the step
            assert widget_value == value
        else:
            assert widget_value == value and value in line, name
    assert row.phase_time == "2m10s" and row.step == "41/100"


def test_the_wording_needs_no_widgets():
    # Text mode runs where there is no widget frontend, and may run where ipywidgets is not
    # installed: the formatter must not import it.
    code = ("import sys, hangkit.jupyter.dashboard_format; "
            "sys.exit('ipywidgets' in sys.modules or 'IPython' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_has_frontend(monkeypatch):
    import IPython

    class Kernel:
        kernel = object()

    monkeypatch.delenv("HANGKIT_NONINTERACTIVE", raising=False)
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert display_module.has_frontend() is False
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())  # a terminal IPython
    assert display_module.has_frontend() is False
    monkeypatch.setattr(IPython, "get_ipython", lambda: Kernel())
    assert display_module.has_frontend() is True
    monkeypatch.setenv("HANGKIT_NONINTERACTIVE", "1")
    assert display_module.has_frontend() is False
    monkeypatch.setenv("HANGKIT_NONINTERACTIVE", "0")
    assert display_module.has_frontend() is True


def test_without_a_frontend_show_prints_text_and_then_only_changes(monkeypatch, capsys):
    monkeypatch.setenv("HANGKIT_NONINTERACTIVE", "1")
    clock = FakeClock(0.0)
    dash = Dashboard(total_steps=100, clock=clock)
    dash.update([status(0, step=1), status(1, step=1)])
    dash.show()
    out = capsys.readouterr().out
    assert "2 ranks: 2 running" in out and "rank 1: running, step 1/100" in out
    for step in range(2, 6):  # steps and clocks move: not news
        clock.t += 1
        assert dash.update([status(0, step=step, beat_age=0.1 * step), status(1, step=step)])
    assert capsys.readouterr().out == ""
    clock.t += 0.5
    dash.update([status(0, step=6), status(1, "stalled", step=5)])  # throttled: nothing yet
    assert capsys.readouterr().out == ""
    clock.t += 0.5
    dash.update([status(0, step=6), status(1, "stalled", step=5)])
    out = capsys.readouterr().out
    assert "2 ranks: 1 running, 1 stalled" in out and "rank 1: stalled" in out
    dash.show_error(1, "RuntimeError: gone")
    assert "Errors:\n  rank 1:\n    RuntimeError: gone" in capsys.readouterr().out


def test_with_a_frontend_show_displays_the_widget(monkeypatch, capsys):
    from hangkit.jupyter import dashboard

    shown = []
    monkeypatch.setattr(dashboard, "has_frontend", lambda: True)
    monkeypatch.setattr(dashboard, "display", shown.append)
    dash = Dashboard()
    dash.show()
    assert shown == [dash.widget]
    assert isinstance(dash.widget, ipywidgets.VBox)
    dash.update([status(0, "stalled")], now=0)
    assert capsys.readouterr().out == ""


# -- the probe matrix ------------------------------------------------------------------------

RESULTS = [
    ProbeResult("environment", 0, "ok", 0.1, "all set"),
    ProbeResult("environment", 1, "warn", 0.1, "TMPDIR is long", "set TMPDIR=/tmp"),
    ProbeResult("torch_distributed", 0, "fail", 2.0, "gloo <init> failed", "check MASTER_ADDR"),
    ProbeResult("torch_distributed", 1, "timeout", 30.0, "no result in 30 s",
                "a rank never joined the rendezvous"),
    ProbeResult("mpi", 0, "skipped", 0.0, "mpi4py missing", "pip install hangkit[local-mpi]"),
]


def test_probe_matrix_cells_are_coloured_by_status():
    matrix = ProbeMatrix(RESULTS)
    assert matrix.names == ["environment", "torch_distributed", "mpi"]
    assert matrix.ranks == [0, 1]
    assert len(matrix.cells) == 6
    # A header row (corner + 3 probes) and a label plus 3 cells per rank.
    assert len(matrix.grid.children) == 4 + 2 * 4
    expect = {("environment", 0): "ok", ("environment", 1): "warn",
              ("torch_distributed", 0): "fail", ("torch_distributed", 1): "timeout",
              ("mpi", 0): "skipped"}
    for cell, state in expect.items():
        button = matrix.cells[cell]
        assert button.style.button_color == PROBE_COLOURS[state], cell
        assert not button.disabled
    assert matrix.cells[("torch_distributed", 1)].description == "TIMEOUT"
    missing = matrix.cells[("mpi", 1)]
    assert missing.disabled and missing.description == "-"
    assert missing.style.button_color == MISSING_COLOUR
    assert len(set(PROBE_COLOURS.values())) == len(PROBE_COLOURS)
    assert {"ok", "warn", "fail", "timeout", "skipped", "error"} <= set(PROBE_COLOURS)


def test_clicking_a_cell_shows_its_detail_and_advice():
    matrix = ProbeMatrix(RESULTS)
    matrix.cells[("torch_distributed", 0)].click()
    assert matrix.selected == ("torch_distributed", 0)
    shown = matrix.output.value
    assert "<b>torch_distributed</b> on rank 0" in shown
    assert "gloo &lt;init&gt; failed" in shown
    assert "<b>advice:</b> check MASTER_ADDR" in shown
    found = matrix.select("environment", 1)
    assert found is RESULTS[1]
    assert "TMPDIR is long" in matrix.output.value and "set TMPDIR=/tmp" in matrix.output.value
    assert "check MASTER_ADDR" not in matrix.output.value
    assert matrix.select("mpi", 1) is None
    assert "no result" in matrix.output.value


def test_probe_matrix_without_ranks_and_its_text():
    results = [ProbeResult("environment", None, "ok", 0.1, "fine"),
               ProbeResult("shm", None, "fail", 0.2, "/dev/shm is 64 MB", "raise --shm-size")]
    matrix = ProbeMatrix(results)
    assert matrix.ranks == [None]
    assert matrix.grid.children[1 + len(matrix.names)].value == "this node"
    matrix.select("shm", None)
    assert "raise --shm-size" in matrix.output.value
    assert matrix.text() == "\n".join(render(results))
    assert "[FAIL] shm: /dev/shm is 64 MB" in matrix.text()
    assert ProbeMatrix(RESULTS).text() == "\n".join(render(RESULTS))
