"""The base of every record, and the words records use as enums."""

from __future__ import annotations

import collections
import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

from hangkit.text import cut

SCHEMA = 1  # 0: reports written before the field existed (hangkit 0.1.0)

E = TypeVar("E", bound=enum.Enum)


class Role(enum.StrEnum):
    """The part a process plays in the job (monitor/roles.py decides)."""

    LAUNCHER = "launcher"  # mpiexec, its proxies, shells and wrappers between them
    RANK = "rank"
    DATALOADER_WORKER = "dataloader-worker"
    OTHER = "other"  # a rank's subprocess


class ProcessState(enum.StrEnum):
    """What a capture found a process doing."""

    BLOCKED = "blocked"  # in a syscall or a wait, using little CPU
    BUSY = "busy"  # on a CPU
    EXITED = "exited"
    UNREADABLE = "unreadable"  # not ours to read
    REMOTE = "remote"  # on another node: what its agent said, no /proc or py-spy


class RankState(enum.StrEnum):
    """The monitor's word for a rank (collector._status decides)."""

    RUNNING = "running"
    BUSY = "busy"  # silent for stall_after, but a look saw its stack progressing
    IDLE = "idle"  # an engine between notebook cells: waiting by intent, never stalled
    WAITING = "waiting"  # stopped inside a collective, waiting for its peers
    SLOW = "slow"  # a straggler
    STALLED = "stalled"  # stopped outside any collective
    SILENT = "silent"  # no beat for a while, but its shim says its process lives (GIL held?)
    UNREACHABLE = "unreachable"  # its node's relay went silent: not observed, not known dead
    DEAD = "dead"  # its process is gone, or it stopped beating
    ERRORED = "errored"  # ended by an exception
    FINISHED = "finished"  # said goodbye

    @property
    def ended(self) -> bool:
        """No process left to ask for anything (stacks, progress)."""
        return self in (RankState.DEAD, RankState.FINISHED, RankState.ERRORED)


class WorkerPhase(enum.StrEnum):
    """A DataLoader worker's state, as its rank's safe DataLoader last saw it."""

    STARTING = "starting"
    IDLE = "idle"  # waiting for indices
    FETCHING = "fetching"  # inside the dataset
    EXITED = "exited"  # with exit_code
    KILLED = "killed"  # by signal

    @property
    def alive(self) -> bool:
        return self not in (WorkerPhase.EXITED, WorkerPhase.KILLED)


class Activity(enum.StrEnum):
    """What a process was doing over a confirmation window (monitor/confirm.py decides)."""

    WAITING = "waiting"  # stack unchanged, blocked in a syscall, a lock, a queue or a collective
    SPINNING = "spinning"  # stack unchanged, on a CPU: a GIL-held C call, a busy-poll, a livelock
    PROGRESSING = "progressing"  # new stacks keep appearing: imports, compilation, real work
    LOOPING = "looping"  # cycling between the same few stacks: a retry loop, a silent loop
    GONE = "gone"  # exited, or could not be sampled

    @property
    def hung(self) -> bool:
        """Whether this process, on its own, is consistent with a hung job."""
        return self is not Activity.PROGRESSING


def parse_enum(kind: type[E], value: Any, fallback: E) -> E:
    """value as a member of kind; a value this version does not know reads as fallback."""
    try:
        return kind(value)
    except ValueError:
        return fallback


class Record:
    """A dataclass that reads and writes itself as JSON, tolerantly (see hangkit.records)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The keys of d that are fields of this record: a newer version's are ignored."""
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
        known = dict(d)
        for k in d.keys() - names:  # usually none, or a message's own few ("type")
            del known[k]
        return known


_FIELD_NAMES: dict[type, frozenset[str]] = {}


# --- reading what a file holds -----------------------------------------------------------------

MAX_PROBLEMS = 20  # fields of the wrong type named; past these, one line says there are more
_WRONG = object()


def conform(cls: type, data: dict[str, Any], problems: list[str], where: str = "",
            *, fill: bool = False) -> dict[str, Any]:
    """data (a JSON object, as json.loads gives it) made fit to build a `cls` from: a field of
    the wrong type at any depth (text where a number belongs, a number where a list does)
    reads as its default, and is named in `problems` ('ranks[0].since_progress: text where a
    number belongs'); an item of the wrong type in a list is left out, and named. fill: a
    required field that is missing reads as its type's zero (as from_json's own defaults
    do), for records inside another. Iterative: a merged stack tree nests hundreds deep."""
    out: dict[str, Any] = {}
    todo = collections.deque([(cls, data, out, where, fill)])  # in order: problems as they come
    while todo:
        kind, source, target, path, fill_missing = todo.popleft()
        target.update(source)  # unknown keys stay: from_json ignores them
        for name, hint, required, check in _fields_of(kind):
            if name not in source:
                if required and fill_missing:
                    target[name] = _zero(hint)
                continue
            value = source[name]
            if check is not None and check(value):
                continue  # most fields: a plain value of the right type, as it is
            value = _fit(hint, value, (path, name), problems, todo)
            if value is not _WRONG:
                target[name] = value
            elif required:
                target[name] = _zero(hint)
            else:
                del target[name]
    return out


_FIELDS: dict[type, list[tuple[str, Any, bool, Any]]] = {}


def _fields_of(cls: type) -> list[tuple[str, Any, bool, Any]]:
    """(name, type, required, a quick check of a value or None) per field of a record."""
    found = _FIELDS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = _FIELDS[cls] = [
            (f.name, hints[f.name], f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING, _quick(hints[f.name]))
            for f in dataclasses.fields(cls)]
    return found


def _quick(hint: Any) -> Any:
    if hint in _SIMPLE:
        return _SIMPLE[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2:
        inner = _SIMPLE.get(next(a for a in args if a is not type(None)))
        if inner is not None:
            return lambda v: v is None or inner(v)
    return None


def _plain_record(cls: Any) -> bool:
    """A record whose fields are all plain values (Frame): checked without copying."""
    return (isinstance(cls, type) and issubclass(cls, Record)
            and all(check is not None for _, _, _, check in _fields_of(cls)))


def _fits(cls: type, d: Any) -> bool:
    if not isinstance(d, dict):
        return False
    for name, _, required, check in _fields_of(cls):
        if name in d:
            if not check(d[name]):
                return False
        elif required:
            return False
    return True


def _path(where: Any) -> str:
    """(parent, name) chains, written out only for a problem: 'ranks[0].since_progress'."""
    parts = []
    while isinstance(where, tuple):
        where, name = where
        parts.append(f"[{name}]" if isinstance(name, int) else f".{cut(str(name), 100)}")
    text = "".join(reversed(parts))
    return (where + text) if where else text.lstrip(".")


def _fit(hint: Any, value: Any, where: Any, problems: list[str], todo: collections.deque
         ) -> Any:
    """value as `hint` takes it, or _WRONG (named in problems)."""
    if hint is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)  # 3.0, as a step given as a float is written: a line number too
    if hint in _SIMPLE:
        if _SIMPLE[hint](value):
            return value
        return _wrong(where, value, _WORDS[hint], problems)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        return _fit(hint, value, where, problems, todo)
    if hint is Any:
        return value
    args = typing.get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            return _wrong(where, value, "a list", problems)
        item = args[0] if args else Any
        if item is Any:
            return value
        quick = _quick(item)
        if quick is not None and all(map(quick, value)):
            return value
        if _plain_record(item) and all(_fits(item, v) for v in value):
            return value  # a stack's frames: checked in place, not copied
        fitted = (_fit(item, v, (where, i), problems, todo) for i, v in enumerate(value))
        return [v for v in fitted if v is not _WRONG]
    if origin is dict:
        if not isinstance(value, dict):
            return _wrong(where, value, "an object", problems)
        item = args[1] if len(args) == 2 else Any
        if item is Any:
            return value
        fitted = ((k, _fit(item, v, (where, k), problems, todo)) for k, v in value.items())
        return {k: v for k, v in fitted if v is not _WRONG}
    if isinstance(hint, type) and issubclass(hint, Record):
        if not isinstance(value, dict):
            return _wrong(where, value, "an object", problems)
        child: dict[str, Any] = {}
        todo.append((hint, value, child, where, True))
        return child
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        # Words this version does not know read as the enum's fallback (parse_enum).
        return value if isinstance(value, str) else _wrong(where, value, "a word", problems)
    return value


def _number(value: Any) -> bool:
    # A bool is an int to Python, not a number to JSON. Past 64 bits no field means an int, and
    # a float of it (a format's :.1f) overflows.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, float) or -(1 << 63) <= value <= (1 << 63)


_SIMPLE = {
    str: lambda v: isinstance(v, str),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool) and _number(v),
    float: _number,
    bool: lambda v: isinstance(v, bool),
}
_WORDS = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}


def _wrong(where: Any, value: Any, expected: str, problems: list[str]) -> object:
    if len(problems) < MAX_PROBLEMS:
        problems.append(f"{_path(where)}: {_kind(value)} where {expected} belongs")
    elif len(problems) == MAX_PROBLEMS:
        problems.append("and more fields of the wrong type")
    return _WRONG


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number" if _number(value) else "a number too large"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _zero(hint: Any) -> Any:
    """What a required field that is missing, or wrong, reads as."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) or hint is Any:
        return None
    if origin is list:
        return []
    if origin is dict:
        return {}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return None  # __post_init__ reads it as the fallback
    if isinstance(hint, type) and issubclass(hint, Record):
        return {}
    return {str: "", int: 0, float: 0.0, bool: False}.get(hint)
