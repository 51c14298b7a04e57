"""The base of every record, and the words records use as enums."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, TypeVar

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
