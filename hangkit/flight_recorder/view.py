"""The ranks' Flight Recorder dumps merged, one view per process group: for each sequence number
which ranks issued it, started it (where the backend records that) and completed it; the first
sequence number on which they disagree; and differences in op, sizes or dtypes.

Pure functions of the recordings. A rank of a group that sent no dump is listed as missing,
never taken for one that agrees.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from hangkit.flight_recorder.dumps import Entry, Group, parsed
from hangkit.records import ProcessSnapshot, Recording, Role
from hangkit.text import format_ranks

MAX_ROWS = 8  # sequence numbers shown per group, from the last one every rank completed
# Ops whose inputs are the same shape on every rank. Others may differ by design (scatter's
# and gather's root, all_to_all's uneven splits): for them only the op is compared.
SAME_SHAPE_OPS = frozenset({
    "all_reduce", "allreduce", "broadcast", "reduce", "all_gather", "allgather",
    "all_gather_into_tensor", "_allgather_base", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "barrier",
})


@dataclass
class Row:
    """One sequence number of one group, across its ranks."""

    seq: int
    op: str  # as most ranks recorded it
    issued: list[int]
    started: list[int] | None  # None: the backend does not record starts
    completed: list[int]
    # "all_reduce Float[58]" -> ranks, only where the ranks recorded different ones
    mismatch: dict[str, list[int]] = field(default_factory=dict)
    entry: Entry | None = None  # one rank's entry (a waiting one's, where there is one)
    entries: dict[int, Entry] = field(default_factory=dict)  # each rank's, where it holds one


@dataclass
class GroupView:
    group: Group
    members: list[int]
    dumped: list[int]  # members whose dump was read
    missing: list[int]  # members without one
    rows: list[Row]
    first_disagreement: int | None  # the first seq not issued by every dumped member, or mismatched
    last_issued: dict[int, int]  # rank -> the last seq it issued

    @property
    def stuck(self) -> Row | None:
        """The row the group stands at: its first disagreement, or else the first collective
        not completed everywhere."""
        for row in self.rows:
            if row.seq == self.first_disagreement or (
                    self.first_disagreement is None and set(row.completed) != set(self.dumped)):
                return row
        return None


def merge(recordings: list[Recording], *, world: list[int] = ()) -> list[GroupView]:
    """One view per group any rank recorded. `world`: the job's ranks, where known, so that a
    rank of the default group without any dump is missing even when no dump names it."""
    # A dump that cannot be read is left out, so its rank reads as missing, not as agreeing.
    per_rank = {r.rank: (info[0], _by_group(info[1])) for r in recordings
                if r.dump and (info := parsed(r)) is not None}
    names = sorted({g for info, _ in per_rank.values() for g in info},
                   key=lambda n: (len(n), n))
    views = []
    for name in names:
        info = [gs[name] for gs, _ in per_rank.values() if name in gs]
        group = max(info, key=lambda g: len(g.ranks))
        members = set(group.ranks) or {r for r, (gs, _) in per_rank.items() if name in gs}
        if name == "0":
            members |= set(world)
        dumped = sorted(r for r in members if r in per_rank)
        views.append(_view(group, sorted(members), dumped,
                           {r: per_rank[r][0].get(name) for r in dumped},
                           {r: per_rank[r][1].get(name, {}) for r in dumped}))
    return views


def of_processes(processes: list[ProcessSnapshot]
                 ) -> tuple[list[GroupView], dict[int, ProcessSnapshot]]:
    """The views of one capture's recordings (none without any), and its ranks by number."""
    ranks = {p.rank: p for p in processes if p.role == Role.RANK and p.rank is not None}
    recordings = [p.recording for p in ranks.values() if p.recording is not None]
    return (merge(recordings, world=list(ranks)) if recordings else []), ranks


def _by_group(found: list[Entry]) -> dict[str, dict[int, Entry]]:
    out: dict[str, dict[int, Entry]] = {}
    for e in found:
        if not e.p2p:  # send/recv count on their own sequence; not merged here
            out.setdefault(e.group, {})[e.seq] = e
    return out


def _view(group: Group, members: list[int], dumped: list[int], counters: dict,
          recorded: dict[int, dict[int, Entry]]) -> GroupView:
    def issued(rank: int) -> int:
        c, seen = counters[rank], recorded[rank]
        return max(c.last_enqueued if c else -1, max(seen, default=-1))

    def completed(rank: int) -> int:
        c, seen = counters[rank], recorded[rank]
        done = [s for s, e in seen.items() if e.completed]
        return max(c.last_completed if c else -1, max(done, default=-1))

    last_issued = {r: issued(r) for r in dumped}
    all_done = min((completed(r) for r in dumped), default=-1)
    top = max(last_issued.values(), default=-1)
    # Sizes are compared over every sequence number all the ranks' buffers still hold: a
    # mismatch that gloo completed anyway is wrong data, not a hang.
    common = max((min(recorded[r]) for r in dumped if recorded[r]), default=1)
    rows, first = [], None
    for seq in range(max(min(common, all_done), 1), top + 1):
        row = _row(seq, dumped, recorded, last_issued, completed)
        if first is None and (row.mismatch or (seq > all_done and set(row.issued) != set(dumped))):
            first = seq
        rows.append(row)
    # Shown: the last collective every rank completed (or the disagreement), and what follows.
    start = next((i for i, r in enumerate(rows) if r.seq == (first or all_done)), 0)
    if first is not None and first > all_done:
        start = max(start - 1, 0)
    rows = rows[start:start + MAX_ROWS]
    return GroupView(group=group, members=members, dumped=dumped,
                     missing=[r for r in members if r not in dumped], rows=rows,
                     first_disagreement=first, last_issued=last_issued)


def _row(seq: int, dumped: list[int], recorded, last_issued, completed) -> Row:
    have = {r: recorded[r][seq] for r in dumped if seq in recorded[r]}
    # A rank whose buffer no longer holds seq but counted past it issued (and completed) it.
    issued = [r for r in dumped if r in have or last_issued[r] >= seq]
    done = [r for r in issued if (r in have and have[r].completed) or completed(r) >= seq]
    starts_known = any(e.started is not None for e in have.values())
    started = sorted(r for r, e in have.items() if e.started) if starts_known else None
    shapes: dict[str, list[int]] = {}
    for r, e in sorted(have.items()):
        same = e.op.removesuffix("_coalesced") in SAME_SHAPE_OPS
        shapes.setdefault(f"{e.op} {e.shape}" if same else e.op, []).append(r)
    ops = Counter(e.op for e in have.values())
    waiting = [e for r, e in sorted(have.items()) if r not in done]
    return Row(seq=seq, op=ops.most_common(1)[0][0] if ops else "?", issued=issued,
               started=started, completed=done, mismatch=shapes if len(shapes) > 1 else {},
               entry=(waiting or list(have.values()) or [None])[0], entries=have)


def render(views: list[GroupView], why_missing: Callable[[int], str] | None = None
           ) -> list[str]:
    """The views as text: per group, its members, whose dump is missing (and why), and one
    line per sequence number around the one it stands at."""
    lines = []
    for v in views:
        if not v.dumped:
            lines.append(f"{v.group.label}: no dump from any of its ranks")
            continue
        if v.stuck is None and (not v.missing or not v.rows):
            last = max(v.last_issued.values(), default=-1)
            lines.append(f"{v.group.label}: every rank completed #{last}" if last > 0 else
                         f"{v.group.label}: no collective yet")
            continue
        # A subgroup's label names its ranks already.
        named = v.group.name != "0" and v.group.ranks
        members = "" if named else f", ranks {format_ranks(v.members)}"
        lines.append(f"{v.group.label}{members}"
                     + (f"; no dump from {format_ranks(v.missing)}" if v.missing else "")
                     + (f"; first disagreement at #{v.first_disagreement}"
                        if v.first_disagreement is not None else ""))
        for row in v.rows:
            parts = [f"issued {format_ranks(row.issued) or '-'}"]
            if row.started is not None:
                parts.append(f"started {format_ranks(row.started) or '-'}")
            parts.append(f"completed {format_ranks(row.completed) or '-'}")
            lines.append(f"  #{row.seq} {row.op}: " + ", ".join(parts))
            lines += [f"    {shape}: {format_ranks(ranks)}"
                      for shape, ranks in row.mismatch.items()]
        if why_missing is not None:
            lines += [f"  no dump from rank {r}: {why_missing(r)}" for r in v.missing]
    return lines

