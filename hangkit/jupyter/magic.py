"""`%%hk`: a cell run on the engines of the latest EngineCluster, as `%%px` runs it, but never
past its deadline.

    %load_ext hangkit.jupyter
    %%hk --timeout 120
    loss = train_step(model, batch)
    print(f"loss {loss:.3f}")

Each engine keeps its namespace from cell to cell (ipyparallel's execute). `--targets 0,2`
runs on some ranks. `--progress-timeout S` also ends a cell whose ranks report no
`hangkit.progress()` for S seconds, once a look finds none of them progressing. `--silence S`
(60 s unless given; 0: off) looks at a cell whose ranks printed nothing and reported no
progress for S seconds, as `hangkit watch --timeout` looks at a silent job: it ends with the
verdict when no rank or DataLoader worker is progressing, and looks again another S later
while one is. `--noblock` returns the running CellRun at once (`.wait()` it later). Every
cell's CellRun is kept in `cluster.cells`. Each rank's output is printed with the rank in
front of it as it arrives, and what a rank raised under its rank.

The cell returns when every rank has finished; or when a rank raised (or the ranks stopped
reporting progress, or went silent) and a look at the others (monitor/confirm.py, as
`hangkit watch` looks) finds none of them progressing: they wait for it (IP-01), or for
something that never comes, and sitting out the deadline would tell nothing more; or at the
deadline. In those cases it shows the hang report, built by the
same path as watch's (capture, records, diagnosis), with a raised rank's exception as the
verdict, writes hang-report.json and .md under a new directory it names, and leaves the
engines as they are: `cluster.interrupt()` ends the cell's work, `cluster.restart()` starts
afresh. The kernel never waits longer than the deadline and one look.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from hangkit.errors import UsageError, check_positive_seconds, check_seconds_or_zero
from hangkit.records import HangReport, StallEvent
from hangkit.text import ranks_phrase

DEFAULT_TIMEOUT = 600.0  # seconds a %%hk cell may run: --timeout
# Seconds with no output and no progress beat from the cell's ranks before a look: --silence.
# As watch's --timeout: long enough that a cell computing quietly costs a look a minute.
DEFAULT_SILENCE = 60.0
POLL = 0.1  # seconds between looks at the engines' output and states
LOOK_EVERY = 5.0  # seconds between looks at the others once a rank has raised
OUTPUT_WAIT = 2.0  # seconds for the last output of ranks that are done
# Seconds for the ranks' last beats after a cell, for the dashboard: a beat a second, late on a
# loaded machine; only waited out in full when a rank's agent is gone.
SETTLE_WAIT = 10.0
_LOCATION = re.compile(r'(?:File "?([^",]+)"?, line (\d+)|File ([^\s:]+):(\d+)|'
                       r'Cell In\[\d+\], line (\d+))')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Frames in engines' cell files are named hk-cell-HASH.py in reports (livestacks.py), so that
# ranks at the same line of the same cell merge; text is said as cells' lines, with its text
# from the cell itself (cluster.cells keeps them).
_CELL_FILE = re.compile(r"(?:\S*ipykernel_\d+/|hk-cell-)(\d+)\.py:(\d+)")


class CellRun:
    """One %%hk cell on its engines: its tasks (RankTasks), what it printed, how it ended."""

    def __init__(self, cluster, code: str, ranks: list[int], timeout: float, *,
                 progress_timeout: float | None = None, silence: float | None = DEFAULT_SILENCE,
                 out=None):
        self.cluster, self.code, self.ranks, self.timeout = cluster, code, ranks, timeout
        self.progress_timeout = progress_timeout
        self.silence = silence or None  # 0: no look for silence
        self.out = out or sys.stdout
        self.tasks = cluster.execute(code, ranks)
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        # The last output, progress beat, or look that found the ranks at work: --silence
        # counts from there.
        self._quiet_since = self.started
        # "finished", "raised", "stalled", "silent", "deadline"
        self.outcome: str | None = None
        self.report: HangReport | None = None
        self.report_dir: Path | None = None
        self._shown: dict[tuple[int, str], int] = {}
        self._errors_shown: set[int] = set()
        self._next_look = 0.0

    def wait(self) -> CellRun:
        """Streams the ranks' output until the cell ends, a raised rank's peers are found
        waiting for it, a look at silent ranks finds none of them progressing, or the
        deadline; then shows how it ended."""
        while True:
            self.stream()
            states = self.tasks.states()
            if all(s != "running" for s in states.values()):
                self.outcome = "finished"
                break
            now = time.monotonic()
            if now >= self.deadline:
                self.outcome = "deadline"
                break
            stalled = self._stalled()
            if "raised" in states.values() or stalled:
                if now >= self._next_look:
                    if self._others_wait():
                        self.outcome = "raised" if "raised" in states.values() else "stalled"
                        break
                    self._next_look = time.monotonic() + LOOK_EVERY
            elif self._silent(now) and self._nothing_moves():
                self.outcome = "silent"
                break
            # Returns as soon as every rank is done; output arrives on ipyparallel's thread.
            self.tasks.wait(min(POLL, max(self.deadline - time.monotonic(), 0.0)))
        self._last_output()
        self.stream()
        if self.outcome != "finished":
            self._hang()
        else:
            self._settle()
        return self

    def _settle(self) -> None:
        """The dashboard, where one is shown, as the cell left the ranks: once each rank's
        agent sent the beat that says this cell ended (or SETTLE_WAIT seconds passed), one
        last update. "idle" alone is not enough: a short cell can end before the monitor heard
        of it, and the last cell's "idle" is still there."""
        if self.cluster.live is None:
            return
        from hangkit.agent.engine import CELL_ENDED

        # A rank that raised is not waited for: its kernel may drop the requests queued after
        # an error (ipykernel's stop_on_error), the one that marks it idle among them.
        done = {r for r, state in self.tasks.states().items() if state == "done"}
        ends_at = time.monotonic() + SETTLE_WAIT
        while time.monotonic() < ends_at and any(
                s.rank in done and s.extra.get(CELL_ENDED) != self.tasks.number
                for s in self.cluster.monitor.statuses()):
            time.sleep(POLL / 2)  # beats come from the engines' agents, polled to a deadline
        self.cluster.live.tick()

    def stream(self) -> None:
        """What each rank printed since last time, each line with its rank in front; what a
        rank raised, once, under its rank."""
        for rank, ar in sorted(self.tasks.results.items()):
            for name in ("stdout", "stderr"):
                text = _metadata(ar, name)
                seen = self._shown.get((rank, name), 0)
                if len(text) > seen:
                    self._shown[(rank, name)] = len(text)
                    self._quiet_since = time.monotonic()
                    for line in text[seen:].splitlines():
                        print(f"[{name}:{rank}] {line}", file=self.out)
        for rank, tb in sorted(self.tasks.errors().items()):
            if rank not in self._errors_shown:
                self._errors_shown.add(rank)
                print(f"[rank {rank}] raised:\n{tb.rstrip()}", file=self.out)

    def _stalled(self) -> bool:
        """With --progress-timeout: every running rank has reported no progress for that
        long (hangkit.progress() calls in the cell's code count)."""
        if self.progress_timeout is None:
            return False
        running = {r for r, s in self.tasks.states().items() if s == "running"}
        quiet = [s.since_progress >= self.progress_timeout
                 for s in self.cluster.monitor.statuses() if s.rank in running]
        return bool(quiet) and all(quiet)

    def _silent(self, now: float) -> bool:
        """With --silence: the running ranks printed nothing and reported no progress (the
        engine's own beat at the cell's start counts) for that long. The ranks' statuses are
        read only once the output has been quiet for --silence, and then again only when the
        latest progress could be that old: cheap at any number of ranks."""
        if self.silence is None or now - self._quiet_since < self.silence:
            return False
        running = {r for r, s in self.tasks.states().items() if s == "running"}
        since = [s.since_progress for s in self.cluster.monitor.statuses() if s.rank in running]
        if since:
            self._quiet_since = max(self._quiet_since, now - min(since))
        return now - self._quiet_since >= self.silence

    def _nothing_moves(self) -> bool:
        """A look at the silent engines (the one `hangkit watch` takes): True when no running
        rank or DataLoader worker of theirs is progressing and the cell neither printed nor
        ended meanwhile (the look's report is then the verdict's); else the silence starts
        again, and the next look is another --silence away."""
        from hangkit.jupyter.livestacks import look_at_engines, progressing

        quiet_since = self._quiet_since
        report = look_at_engines(self.cluster, why=self._silence_reason())
        running = {r for r, s in self.tasks.states().items() if s == "running"}
        moving = progressing(report, running)  # workers carry their rank's number
        self.stream()  # what the ranks printed during the look
        if running and not moving and self._quiet_since == quiet_since:
            self.report = report
            return True
        if moving:  # as watch says it
            from hangkit.monitor.confirm import progressing_phrase

            print(f"hangkit: no output or progress for {self.silence:g} s, but "
                  f"{progressing_phrase(moving)}; looking again in {self.silence:g} s",
                  file=self.out)
        self._quiet_since = max(self._quiet_since, time.monotonic())
        return False

    def _silence_reason(self) -> str:
        return (f"a %%hk cell: no output and no progress for {self.silence:g} s "
                f"(--silence {self.silence:g}), and nothing was progressing")

    def _last_output(self) -> None:
        """A rank's reply can come before the last of its output: waits for the output of
        the ranks that are done, for OUTPUT_WAIT seconds in all."""
        ends_at = time.monotonic() + OUTPUT_WAIT
        for ar in self.tasks.results.values():
            if ar.ready():
                ar.wait_for_output(max(ends_at - time.monotonic(), 0.01))

    def _others_wait(self) -> bool:
        """A look at the engines still running: True when none of them is progressing."""
        from hangkit.jupyter.livestacks import look_at_engines, progressing

        report = look_at_engines(self.cluster, why="a %%hk cell: a rank raised")
        running = {r for r, s in self.tasks.states().items() if s == "running"}
        moving = progressing(report, running)
        if not moving:
            self.report = report
        return not moving

    def _hang(self) -> None:
        from hangkit.jupyter.livestacks import look_at_engines
        from hangkit.monitor.diagnose import diagnose
        from hangkit.monitor.report import render_summary, write_report

        elapsed = time.monotonic() - self.started
        if self.outcome == "raised":
            why = f"a %%hk cell: {raised_phrase(self.tasks.errors())} and the others wait"
        elif self.outcome == "stalled":
            why = (f"a %%hk cell: no rank reported progress for {self.progress_timeout:g} s "
                   "(--progress-timeout)")
        elif self.outcome == "silent":
            why = self._silence_reason()
        else:
            why = f"a %%hk cell ran past its deadline (--timeout {self.timeout:g})"
        report = self.report or look_at_engines(self.cluster, why=why)
        report.reason, report.idle_seconds = why, round(elapsed, 1)
        cells = cell_sources(self.cluster.cells, self)
        for rank, tb in sorted(self.tasks.errors().items()):
            report.events.append(StallEvent(
                "raised", f"rank {rank} raised {summarise(tb, self.code)}; "
                + where_others_are(report, rank, cells), ranks=[rank]))
        report.diagnosis = diagnose(report.processes, report.events, report.looks)
        for d in report.diagnosis:  # in the cells' terms, not the engines' temporary files
            d.summary = in_cell(d.summary, cells)
        self.report = report
        if self.cluster.live is not None:  # one verdict, in the cell and on the dashboard
            self.cluster.live.dashboard.show_stacks(report.tree, report.diagnosis,
                                                    note="from the %%hk cell")
        self.report_dir = Path(f"hangkit-notebook-report-{time.strftime('%Y%m%d-%H%M%S')}")
        json_path, md_path = write_report(report, self.report_dir)
        for line in render_summary(report):
            print(in_cell(line, cells), file=self.out)
        print(f"hangkit: report: {md_path} (and {json_path.name} beside it)", file=self.out)
        print("hangkit: the engines are left as they are: cluster.interrupt() ends the cell's "
              "work on them, cluster.restart() starts new ones", file=self.out)

    def __repr__(self) -> str:
        return f"<%%hk {self.tasks!r}{', ' + self.outcome if self.outcome else ''}>"


def _metadata(ar, name: str) -> str:
    try:
        return ar.metadata.get(name) or ""
    except Exception:  # not yet sent by the engine
        return ""


def summarise(traceback_text: str, code: str = "") -> str:
    """'ValueError: boom at example.py:92', 'ValueError: boom at the cell's line 4 (`raise
    ValueError("boom")`)': the exception's last line and its innermost location, from an
    engine's traceback (ANSI colours removed)."""
    text = _ANSI.sub("", traceback_text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    error = lines[-1] if lines else "an exception"
    places = _LOCATION.findall(text)
    if not places:
        return error
    file1, line1, file2, line2, cell_line = places[-1]
    where = cell_text(int(cell_line), code) if cell_line else \
        (f"{file1}:{line1}" if file1 else f"{file2}:{line2}")
    return f"{error} at {where}"


def cell_text(line: int, code: str, name: str = "the cell") -> str:
    """"the cell's line 4 (`comm.Barrier()`)". IPython numbers a cell's lines from its first
    line that is not blank."""
    lines = code.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    return f"{name}'s line {line}" + (f" (`{text}`)" if text else "")


def cell_sources(cells: list, current: CellRun) -> dict[str, tuple[str, str]]:
    """{hash ipykernel names a cell's file by: (how to call the cell, its code)}."""
    try:
        from ipykernel.compiler import get_tmp_hash_seed, murmur2_x86
    except ImportError:  # another kernel: cells are then said by their line alone
        return {}
    seed = get_tmp_hash_seed()
    out = {str(murmur2_x86(c.code, seed)): (f"%%hk cell {i}", c.code)
           for i, c in enumerate(cells, 1)}
    out[str(murmur2_x86(current.code, seed))] = ("the cell", current.code)
    return out


def in_cell(text: str, cells: dict[str, tuple[str, str]]) -> str:
    """Locations in an engine's cell files said as cells' lines."""
    def said(m: re.Match) -> str:
        name, code = cells.get(m.group(1), ("a cell", ""))
        return cell_text(int(m.group(2)), code, name)

    return _CELL_FILE.sub(said, text)


def raised_phrase(errors: dict[int, str]) -> str:
    return f"{ranks_phrase(errors)} raised" if errors else "no rank raised"


def where_others_are(report: HangReport, rank: int, cells: dict[str, tuple[str, str]]) -> str:
    """'ranks 0,1,3 are in <module> at the cell's line 5 (`comm.Barrier()`)'."""
    by_place: dict[str, list[int]] = {}
    for g in report.groups:
        for r in g.ranks:
            if r != rank:
                by_place.setdefault(in_cell(g.location, cells), []).append(r)
    parts = [f"{ranks_phrase(rs)} {'is' if len(rs) == 1 else 'are'} in {place}"
             for place, rs in by_place.items()]
    return "; ".join(parts) or "no other rank was seen"


def parse_targets(text: str | None, ranks: list[int]) -> list[int]:
    """'0,2' or '1-3' or 'all' (None) as ranks of the cluster; UsageError naming a bad one."""
    if text in (None, "", "all"):
        return list(ranks)
    chosen = []
    for part in text.split(","):
        try:
            low, _, high = part.partition("-")
            chosen += range(int(low), int(high or low) + 1)
        except ValueError:
            raise UsageError(f"--targets {text!r}: not ranks like 0,2 or 1-3") from None
    unknown = sorted(set(chosen) - set(ranks))
    if unknown:
        raise UsageError(f"--targets {text!r}: no engine for {ranks_phrase(unknown)} "
                         f"(the cluster has {ranks_phrase(ranks)})")
    return sorted(set(chosen))


def run_cell(line: str, cell: str, *, out=None) -> CellRun | None:
    """What `%%hk LINE` does with its cell: parses the options, runs, waits; the running
    CellRun with --noblock."""
    import argparse
    import shlex

    from hangkit.jupyter.cluster import EngineCluster

    parser = argparse.ArgumentParser(prog="%%hk", add_help=False, exit_on_error=False)
    parser.add_argument("--targets", default=None)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--noblock", action="store_true")
    parser.add_argument("--progress-timeout", type=float, default=None)
    parser.add_argument("--silence", type=float, default=DEFAULT_SILENCE)
    try:
        args, extra = parser.parse_known_args(shlex.split(line))
    except (argparse.ArgumentError, ValueError) as e:
        raise UsageError(f"%%hk {line}: {e}") from None
    if extra:
        raise UsageError(f"%%hk: unknown option {extra[0]!r} (--targets, --timeout, "
                         "--progress-timeout, --silence, --noblock)")
    check_positive_seconds("--timeout", args.timeout)
    check_seconds_or_zero("--silence", args.silence)
    if args.progress_timeout is not None:
        check_positive_seconds("--progress-timeout", args.progress_timeout)
    cluster = EngineCluster.current()
    if cluster is None:
        raise UsageError("%%hk: no EngineCluster is running: start one with "
                         "EngineCluster(4).start()")
    run = CellRun(cluster, cell, parse_targets(args.targets, cluster.ranks), args.timeout,
                  progress_timeout=args.progress_timeout, silence=args.silence, out=out)
    cluster.cells.append(run)
    if args.noblock:
        return run
    run.wait()
    return None  # as %%px: the cell shows its ranks' output, not a value (see cluster.cells)
