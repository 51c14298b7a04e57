"""torch's Flight Recorder dumps: what one holds, read from any file torch or hangkit wrote, and
written again in the layout torch's analyzer reads.

A dump (torch's format, hangkit.records.Recording.dump) has `entries`, one per collective;
`pg_status`, each group's counters (last enqueued, started, completed); and `pg_config`, each
group's ranks. What each backend records differs:
- gloo: every entry's state is "scheduled"; `retired` turns true when the work completes.
- NCCL: the state moves scheduled -> started -> completed, "started" only when timing is on
  (TORCH_NCCL_ENABLE_TIMING=1); the watchdog retires an entry once it completed.
So a collective is completed when its state says so or it is retired, and "started" is known only
where the backend records it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from hangkit.errors import UsageError
from hangkit.files import private_directory, write_atomic
from hangkit.records import Frame, Recording
from hangkit.safeload import (
    DUMP_LIMITS,
    NotYours,
    Refused,
    load_json,
    load_pickle,
    plain_data,
    read_bytes,
    shared_directory,
)

# The analyzer infers one common prefix from the names ending in a rank number: nothing else in
# a report directory ends in digits.
ANALYZER_PREFIX = "flight_recorder_rank_"
_RANK_AT_END = re.compile(r"(\d+)(?:\.json)?$")  # .json: as a support bundle holds them
MAX_DUMP_BYTES = DUMP_LIMITS.bytes


@dataclass(frozen=True)
class Entry:
    """One collective (or point-to-point op) of one group, as one rank recorded it."""

    group: str  # the group's name: "0" is the default group
    seq: int  # per group: collective_seq_id, or p2p_seq_id for send/recv
    op: str  # "all_reduce", without the backend's prefix
    backend: str  # "gloo", "nccl"
    completed: bool
    started: bool | None  # None where the backend does not record it
    p2p: bool
    input_sizes: tuple
    input_dtypes: tuple
    output_sizes: tuple
    output_dtypes: tuple
    frames: tuple[Frame, ...]  # where it was issued, outermost first; () when not recorded

    @property
    def shape(self) -> str:
        """'Float[58]', 'Float[2, 3] Long[1]': the inputs' dtypes and sizes."""
        parts = [f"{dtype}{list(size)}" for dtype, size in
                 zip(self.input_dtypes, self.input_sizes, strict=False)]
        return " ".join(parts) or "no tensors"


@dataclass(frozen=True)
class Group:
    """One process group as one rank's recorder counts it."""

    name: str
    desc: str
    ranks: tuple[int, ...]  # empty when the dump does not say
    last_enqueued: int
    last_started: int
    last_completed: int

    @property
    def label(self) -> str:
        """'the default group', 'group 1 (ranks 0,1)'."""
        if self.name == "0":
            return "the default group"
        members = f"ranks {','.join(map(str, self.ranks))}" if self.ranks else ""
        desc = self.desc if self.desc not in ("", "undefined", self.name) else ""
        inside = ", ".join(x for x in (desc, members) if x)
        return f"group {self.name}" + (f" ({inside})" if inside else "")


def entries(recording: Recording) -> list[Entry]:
    status = recording.dump.get("pg_status", {})
    out = []
    for e in recording.dump.get("entries", []):
        group = str((e.get("process_group") or ["?"])[0])
        backend, _, op = str(e.get("profiling_name", "")).rpartition(":")
        p2p = bool(e.get("is_p2p"))
        seq = int((e.get("p2p_seq_id") if p2p else e.get("collective_seq_id")) or 0)
        state = e.get("state")
        counters = status.get(group, {})
        done = _counter(counters, "last_completed_collective")
        # Starts are recorded only with timing on (NCCL's TORCH_NCCL_ENABLE_TIMING): then the
        # group's last started collective is counted; without, "scheduled" says nothing more.
        timing = _counter(counters, "last_started_collective") >= 0
        out.append(Entry(
            group=group, seq=seq, op=op or "collective", backend=backend, p2p=p2p,
            completed=state == "completed" or e.get("retired") is True
            or (not p2p and 0 <= seq <= done),
            started=state in ("started", "completed") if timing else None,
            input_sizes=_tuples(e.get("input_sizes")),
            input_dtypes=tuple(e.get("input_dtypes") or ()),
            output_sizes=_tuples(e.get("output_sizes")),
            output_dtypes=tuple(e.get("output_dtypes") or ()),
            frames=tuple(Frame(function=str(f.get("name", "?")), file=str(f.get("filename", "")),
                               line=f.get("line")) for f in reversed(e.get("frames") or ()))))
    return out


def groups(recording: Recording) -> dict[str, Group]:
    config = recording.dump.get("pg_config", {})
    status = recording.dump.get("pg_status", {})
    descs = {str(e["process_group"][0]): str(e["process_group"][1])
             for e in recording.dump.get("entries", []) if len(e.get("process_group") or ()) == 2}
    out = {}
    for name in {*config, *status, *descs} - {""}:
        c, s = config.get(name, {}), status.get(name, {})
        out[name] = Group(
            name=name, desc=str(c.get("desc") or descs.get(name, "")),
            ranks=_ranks(c.get("ranks")), last_enqueued=_counter(s, "last_enqueued_collective"),
            last_started=_counter(s, "last_started_collective"),
            last_completed=_counter(s, "last_completed_collective"))
    return out


def _counter(status: dict, name: str) -> int:
    try:
        return int(status.get(name, -1))
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        return -1


def _ranks(text) -> tuple[int, ...]:
    if isinstance(text, list | tuple):
        return tuple(int(r) for r in text)
    try:
        return tuple(int(r) for r in json.loads(str(text or "[]")))
    except (ValueError, TypeError, OverflowError, RecursionError):  # "[[[[...", a dump's text
        return ()


def _tuples(sizes) -> tuple:
    return tuple(tuple(s) if isinstance(s, list | tuple) else (s,) for s in sizes or ())


# Files


def read_dump(path: Path, *, owned_only: bool = False, cut_at: int | None = None) -> dict:
    """A dump file, JSON or pickle, as torch writes either, read within DUMP_LIMITS (size,
    depth, objects: hangkit/safeload.py) by readers that load no object. UsageError of one line
    for anything else. owned_only: NotYours for a file that is not the user's own (one found
    where others can write). cut_at: strings longer are cut, for showing."""
    data = read_bytes(path, DUMP_LIMITS, owned_only=owned_only)
    try:
        if data[:64].lstrip()[:1] == b"{":
            dump = load_json(data, DUMP_LIMITS, cut_at=cut_at)
        else:
            dump = plain_data(load_pickle(data, DUMP_LIMITS), DUMP_LIMITS, cut_at=cut_at)
    except Refused as e:
        raise UsageError(f"{path}: not a Flight Recorder dump hangkit reads ({e})") from None
    if not isinstance(dump, dict) or "entries" not in dump:
        raise UsageError(f"{path}: not a Flight Recorder dump (no entries)")
    if parsed(Recording(rank=0, dump=dump)) is None:
        raise UsageError(f"{path}: not a Flight Recorder dump (its entries are not torch's)")
    return dump


def plain(dump: dict) -> dict:
    """A dump as JSON carries it (tuples as lists, keys as text), as an agent sends it. For a
    dump of this process's own recorder: one read from a file goes through read_dump."""
    return json.loads(json.dumps(dump, default=str))


# The sequence numbers of one group across the ranks' dumps of one job lie within its buffers
# (torch keeps 2,000 entries) and the collectives in flight. The merged view walks every number
# between the lowest and the highest: dumps of two jobs mixed, or a counter of 10**18, would
# keep it walking for ever.
MAX_SPAN = 100_000


def implausible(recordings: list[Recording]) -> str | None:
    """Why these dumps cannot be one job's (a group's sequence numbers spanning more than
    MAX_SPAN), or None."""
    spans: dict[str, tuple[int, int]] = {}
    for r in recordings:
        info = parsed(r) if r.dump else None
        if info is None:
            continue
        found, listed = info
        numbers = [(g.name, n) for g in found.values()
                   for n in (g.last_enqueued, g.last_started, g.last_completed)]
        numbers += [(e.group, e.seq) for e in listed if not e.p2p]
        for group, n in numbers:
            n = max(n, 1)  # the view starts at 1 where a rank completed nothing
            low, high = spans.get(group, (n, n))
            spans[group] = (min(low, n), max(high, n))
    for group, (low, high) in sorted(spans.items()):
        if high - low > MAX_SPAN:
            return (f"group {group}'s sequence numbers run from {low} to {high}: not one "
                    "job's dumps")
    return None


def parsed(recording: Recording) -> tuple[dict[str, Group], list[Entry]] | None:
    """(groups(), entries()) of a dump, read once; None for a dump of another layout, which is
    not used."""
    try:
        return groups(recording), entries(recording)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError):
        return None


def read_directory(directory: Path, *, cut_at: int | None = None,
                   skipped: list[str] | None = None) -> list[Recording]:
    """Every dump in a directory: files whose names end in their rank (nccl_trace_rank_3,
    flight_recorder_rank_3, as TORCH_FR_DUMP_TEMP_FILE names them; nccl_trace_rank_3.json in
    a support bundle). In a directory others can write (/tmp), only the user's own files are
    read: each other one is named in `skipped`. cut_at: as read_dump."""
    shared = shared_directory(directory)
    found: dict[int, Recording] = {}
    for path in sorted(directory.iterdir()):
        m = _RANK_AT_END.search(path.name)
        if not m or not path.is_file():
            continue
        rank = int(m.group(1))
        try:
            dump = read_dump(path, owned_only=shared, cut_at=cut_at)
        except NotYours as e:
            if skipped is not None:
                skipped.append(str(e))
            continue
        if rank in found:
            first = Path(found[rank].source).name
            raise UsageError(f"{directory}: two dumps of rank {rank}: {first} and {path.name}; "
                             "give a directory with one job's dumps")
        found[rank] = Recording(rank=rank, dump=dump, source=str(path))
    return [found[r] for r in sorted(found)]


def dump_rank(path: Path) -> int | None:
    """The rank a dump file's name ends in (nccl_trace_rank_3, nccl_trace_rank_3.json), or
    None for a name that is not a dump's."""
    m = _RANK_AT_END.search(path.name)
    return int(m.group(1)) if m else None


def write_for_analyzer(recordings: list[Recording], directory: Path) -> list[Path]:
    """One pickle per rank in the layout `python -m torch.distributed.flight_recorder.fr_trace
    DIRECTORY` reads; private like the rest of a report."""
    directory = private_directory(directory)
    written = []
    for r in recordings:
        path = directory / f"{ANALYZER_PREFIX}{r.rank}"
        write_atomic(path, pickle.dumps(r.dump), mode=0o600)
        written.append(path)
    return written


def dump_files(prefix: str) -> list[Path]:
    """The files torch wrote with this TORCH_FR_DUMP_TEMP_FILE prefix (prefix + rank)."""
    folder, start = os.path.split(prefix)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    return sorted(Path(folder or ".", n) for n in names
                  if n.startswith(start) and _RANK_AT_END.search(n))
