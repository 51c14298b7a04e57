"""What the dashboard shows, worded once: the one formatter behind its widgets and its text.

Pure functions of records, and no widget import, so that text mode (a kernel without a widget
frontend) and the tests of the wording need no ipywidgets. dashboard.py copies these values
into its widgets and nothing else, as tqdm.notebook's bar and its text both come from
format_meter: were the widgets and the text to word a value each their own way, they would
drift apart and a person comparing a notebook with a log would see two stories.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hangkit.monitor.merge import render_tree
from hangkit.monitor.report import render_workers
from hangkit.records import Diagnosis, RankState, RankStatus, StallEvent, TreeNode

# The order the header counts states in: the monitor's own, from working to ended.
STATES: tuple[RankState, ...] = tuple(RankState)
EVENTS_SHOWN = 20


def state_of(status: RankStatus) -> RankState:
    """The dashboard's state for a rank: the monitor's status, with an error taking precedence
    over "finished". (RankStatus already reads a status this version does not know as
    running.)"""
    if status.status == RankState.FINISHED and status.error:
        return RankState.ERRORED
    return status.status


def format_duration(x: float | None) -> str:
    """Seconds as a person reads them: "4.2 s", "2m10s", "3h05m"; "-" for none."""
    if x is None:
        return "-"
    if x < 100:
        return f"{x:.1f} s"
    if x < 3600:
        return f"{int(x) // 60}m{int(x) % 60:02d}s"
    return f"{int(x) // 3600}h{int(x) % 3600 // 60:02d}m"


def collective_text(status: RankStatus) -> str:
    """'all_reduce #7 (inside 2.5 s)', 'Barrier #3 on 0,1 (not inside)'; "" for none."""
    c = status.collective
    if c is None:
        return ""
    return f"{c.describe()} (inside {format_duration(c.seconds)})" if c.inside \
        else f"{c.describe()} (not inside)"


def rank_key(rank: int | str) -> str:
    """A rank's key as RankStatus.key spells it: "rank 3"; a key passed as is."""
    return rank if isinstance(rank, str) else f"rank {rank}"


def _key_order(key: str) -> tuple:
    # "rank 2" before "rank 10", and both before "pid 1234"
    kind, _, number = key.partition(" ")
    return (kind != "rank", int(number) if number.isdigit() else 0, key)


def _status_order(status: RankStatus) -> tuple:
    return (status.rank is None, status.rank if status.rank is not None else status.pid)


def by_rank(statuses: Iterable[RankStatus]) -> list[RankStatus]:
    """Ranks in rank order, then the processes without a rank, by pid."""
    return sorted(statuses, key=_status_order)


def steps_total(statuses: Iterable[RankStatus], total_steps: int | None) -> int:
    """What the bars fill towards: the known total, else the step of the rank furthest ahead
    (so that, without a total, the bars compare the ranks with each other)."""
    if total_steps:
        return total_steps
    return max((s.step for s in statuses if s.step is not None), default=0)


@dataclass(frozen=True)
class RowText:
    """Every value one rank's row shows, each worded once, for the widgets and the text."""

    key: str  # "rank 3", or "pid 1234"
    tooltip: str  # "pid 1003 on node1"
    state: RankState  # state_of(): what colours the row
    bar_value: int  # the step, clamped into 0 .. bar_max so the progress bar accepts it
    bar_max: int
    step: str  # "42/100", or "-" before the rank's first step
    phase: str  # "" outside any phase
    phase_time: str  # how long in the phase; "" outside any phase
    beat: str  # "beat 0.4 s ago"
    collective: str  # collective_text()
    workers: tuple[str, ...]  # one line per DataLoader worker
    error: str  # the last line of the exception that ended the rank's work, or ""


def row_text(status: RankStatus, total: int) -> RowText:
    """The row of one rank; `total` is steps_total() of all the ranks shown."""
    bar_max = max(total, 1)  # a progress bar's max must be positive
    step = status.step if status.step is not None else 0
    return RowText(
        key=status.key,
        tooltip=f"pid {status.pid} on {status.host}",
        state=state_of(status),
        bar_value=min(max(step, 0), bar_max),
        bar_max=bar_max,
        step="-" if status.step is None else f"{status.step}/{total}",
        phase=status.phase or "",
        phase_time=format_duration(status.phase_seconds) if status.phase else "",
        beat=f"beat {format_duration(status.beat_age)} ago",
        collective=collective_text(status),
        workers=tuple(render_workers(status.workers)),
        # How its process ended, as its shim saw it (`hangkit rank`): "was killed by signal 9".
        error=status.error or (f"its process {status.exit}" if status.exit and
                               status.status == RankState.DEAD else ""),
    )


def row_line(row: RowText) -> str:
    """A row as one line of text; its workers go on the lines below it."""
    parts = [f"{row.key}: {row.state}", f"step {row.step}"]
    if row.phase:
        parts.append(f"phase {row.phase} for {row.phase_time}")
    parts.append(row.beat)
    if row.collective:
        parts.append(row.collective)
    if row.error:
        parts.append(f"error: {row.error}")
    return ", ".join(parts) + f" ({row.tooltip})"


def header_counts(statuses: Iterable[RankStatus]) -> list[tuple[RankState, int]]:
    """How many ranks are in each state, in STATES order, leaving out the states none is in."""
    counts = Counter(state_of(s) for s in statuses)
    return [(state, counts[state]) for state in STATES if counts[state]]


def ranks_title(n: int) -> str:
    return f"{n} rank{'' if n == 1 else 's'}"


def count_text(state: RankState, count: int) -> str:
    return f"{count} {state}"


def header_line(statuses: Sequence[RankStatus]) -> str:
    """'3 ranks: 2 running, 1 stalled'."""
    counts = ", ".join(count_text(state, c) for state, c in header_counts(statuses))
    return ranks_title(len(statuses)) + (f": {counts}" if counts else "")


def event_lines(events: Iterable[StallEvent]) -> list[str]:
    """The latest EVENTS_SHOWN events, latest first, with their catalogue id where the
    summary does not already name it."""
    shown = list(events)[-EVENTS_SHOWN:][::-1]
    return [f"[{e.kind}] {e.summary}"
            + (f" ({e.case})" if e.case and e.case not in e.summary else "")
            for e in shown]


def error_texts(statuses: Iterable[RankStatus], shown: Mapping[str, str]) -> dict[str, str]:
    """Each rank's error, by rank key in rank order. `shown` (full tracebacks, by rank key)
    wins over the last line a rank's beat carried."""
    texts = {s.key: s.error for s in statuses if s.error}
    texts.update(shown)
    return {key: texts[key] for key in sorted(texts, key=_key_order)}


def render_text(statuses: Sequence[RankStatus], total: int, *,
                events: Iterable[StallEvent] = (), errors: Mapping[str, str] | None = None,
                tree: TreeNode | None = None, diagnoses: Sequence[Diagnosis] = (),
                note: str = "") -> str:
    """Everything the dashboard shows, as plain text: what text mode prints."""
    lines = [header_line(statuses)]
    for s in by_rank(statuses):
        row = row_text(s, total)
        lines.append(row_line(row))
        lines += ["    " + w for w in row.workers]
    shown_events = event_lines(events)
    if shown_events:
        lines += ["Events (latest first):"] + ["  " + t for t in shown_events]
    texts = error_texts(statuses, errors or {})
    if texts:
        lines.append("Errors:")
        for key, text in texts.items():
            lines.append(f"  {key}:")
            lines += ["    " + t for t in text.rstrip().splitlines()]
    if tree is not None or diagnoses or note:
        lines.append("Stacks" + (f" ({note})" if note else "") + ":")
        lines += ["  " + t for t in (render_tree(tree) if tree else [])]
        if diagnoses:
            lines.append("Diagnosis:")
            for d in diagnoses:
                lines += [f"  [{d.kind}] {d.summary}", f"      advice: {d.advice}"]
    return "\n".join(lines)
