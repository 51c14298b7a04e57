"""Beats in batches: the form a node's relay sends its ranks' beats in, once a second.

At thousands of ranks the monitor's cost is per beat, so a batch carries what changes and
little else:
- rows, not objects: one list of values per beat, in the order of `columns`;
- what never changes for a rank's process (its host, world size, faulthandler file and
  signal, main thread's id: STATIC_FIELDS) only when it changed, or every FULL_EVERY
  batches, so a monitor that missed one catches up;
- the node's shims, and the columns themselves, only when they changed, or every FULL_EVERY
  batches;
- a collective as a list of its values, in the order of COLLECTIVE_FIELDS.
The monitor (monitor/collector.py) fills the statics of a row from the rank's last beat; a row
of a rank it does not know yet waits for its statics. Stdlib only: the relay imports it.
"""

from __future__ import annotations

import dataclasses

from hangkit.records import Beat, CollectiveState, WorkerState

STATIC_FIELDS = ("host", "world_size", "dump_file", "dump_signal", "main_ident")
COLUMNS = ("type",) + tuple(f.name for f in dataclasses.fields(Beat)
                            if f.name not in STATIC_FIELDS)
COLLECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(CollectiveState))
FULL_EVERY = 10  # batches between two that carry the columns, every rank's statics, the shims
_FIELDS = frozenset(f.name for f in dataclasses.fields(Beat))


def key_of(message: dict) -> str:
    """"rank 3", or "pid 1234" for a process without a rank: as the monitor keys ranks."""
    rank = message.get("rank")
    return f"rank {rank}" if rank is not None else f"pid {message.get('pid')}"


class Encoder:
    """The relay's side: remembers what it sent, to send statics and shims only anew."""

    def __init__(self):
        self._statics: dict[str, tuple] = {}  # rank key: (its statics, its pid) as last sent
        self._shims: list | None = None
        self._count = 0

    def batch(self, beats: list[tuple[dict, float]], shims: list[dict], **head) -> dict:
        """The batch of `beats`, each (the agent's message, seconds it waited here)."""
        self._count += 1
        full = self._count % FULL_EVERY == 1
        rows, statics = [], {}
        for beat, held in beats:
            beat = aged(beat, held)
            row = [beat.get(c) for c in COLUMNS]
            if isinstance(beat.get("collective"), dict):
                row[_COLLECTIVE] = [beat["collective"].get(f) for f in COLLECTIVE_FIELDS]
            rows.append(row)
            key, mine = key_of(beat), tuple(beat.get(s) for s in STATIC_FIELDS)
            # A new pid is a restarted rank: the monitor takes it from its statics only.
            if full or self._statics.get(key) != (mine, beat.get("pid")):
                statics[key] = dict(zip(STATIC_FIELDS, mine))
                self._statics[key] = (mine, beat.get("pid"))
        out = {"type": "batch", **head, "rows": rows, "statics": statics}
        if full:
            out["columns"] = COLUMNS
        if full or shims != self._shims:
            out["shims"] = self._shims = shims
        return out

    def lost(self) -> None:
        """The last batch did not go out: the next one carries everything."""
        self._statics.clear()
        self._shims = None
        self._count = 0


def aged(beat: dict, held: float) -> dict:
    """The beat as if sent now: the times it counts grow by how long it waited."""
    out = dict(beat)
    for name in ("since_progress", "phase_seconds"):
        if isinstance(out.get(name), int | float):
            out[name] = round(out[name] + held, 3)
    collective = out.get("collective")
    if isinstance(collective, dict) and collective.get("inside"):
        seconds = collective.get("seconds")
        if isinstance(seconds, int | float):
            out["collective"] = {**collective, "seconds": round(seconds + held, 3)}
    return out


def beats(message: dict, last, columns=()) -> list[tuple[Beat, bool]]:
    """The monitor's side: each row of a batch as (its Beat, whether it is a goodbye). The
    columns are the batch's, else `columns` (the node's, from its last batch that had them).
    A row's statics come from the batch, or from last(key), the rank's last Beat on this node
    (None when unknown: the row waits for a batch that carries them). Thousands a second:
    columns this version does not know are dropped once for the whole batch, and a row of a
    known rank is its last beat with the row's values put in."""
    columns, given = message.get("columns") or columns, message.get("statics") or {}
    known = [(i, c) for i, c in enumerate(columns) if c in _FIELDS]
    kind = columns.index("type") if "type" in columns else None
    out = []
    for row in message.get("rows") or ():
        values = {c: row[i] for i, c in known}
        key = key_of(values)
        statics = given.get(key)
        if statics is not None:
            beat = Beat(**values, **{s: statics.get(s) for s in STATIC_FIELDS})
        else:
            before = last(key)
            if before is None or before.pid != values.get("pid"):
                continue
            beat = Beat.__new__(Beat)  # its last beat, the row's values put in
            beat.__dict__ = {**before.__dict__, **values}
        if beat.collective is not None:
            beat.collective = _collective(beat.collective)
        if beat.workers:
            beat.workers = [WorkerState.from_json(w) for w in beat.workers]
        out.append((beat, kind is not None and row[kind] == "bye"))
    return out


def _collective(value) -> CollectiveState | None:
    """A row's collective: its values in COLLECTIVE_FIELDS order (a newer relay's extra ones
    at the end are left out), or a dict."""
    if isinstance(value, list):
        return CollectiveState(*value[:len(COLLECTIVE_FIELDS)])
    return CollectiveState.from_json(value)


_COLLECTIVE = COLUMNS.index("collective")
