"""Records: the one language between layers.

Plain dataclasses with to_json()/from_json(). Capture produces them; the terminal summary, the
Markdown report, the JSON file (and later the widgets) are pure functions of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ROLES = ("launcher", "rank", "dataloader-worker", "other")
STATES = ("blocked", "busy", "exited", "unreadable", "remote")


class _Record:
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Frame(_Record):
    """One stack frame. `native` frames come from C libraries (py-spy --native)."""

    function: str
    file: str
    line: int | None = None
    native: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Frame:
        return cls(d["function"], d["file"], d.get("line"), d.get("native", False))

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass
class ThreadStack(_Record):
    """A thread's stack, frames ordered outermost first, innermost last (as in a traceback)."""

    id: int
    name: str | None
    frames: list[Frame] = field(default_factory=list)
    os_thread_id: int | None = None
    is_main: bool = False
    owns_gil: bool = False
    active: bool | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ThreadStack:
        return cls(
            id=d["id"],
            name=d.get("name"),
            frames=[Frame.from_json(f) for f in d.get("frames", [])],
            os_thread_id=d.get("os_thread_id"),
            is_main=d.get("is_main", False),
            owns_gil=d.get("owns_gil", False),
            active=d.get("active"),
        )


@dataclass
class Syscall(_Record):
    """What the kernel says a blocked thread is doing: the syscall, and what it waits on."""

    name: str
    number: int
    target: str | None = None  # the file, socket or pipe behind the fd, or the path being opened

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Syscall | None:
        return cls(d["name"], d["number"], d.get("target")) if d else None

    def describe(self) -> str:
        return f"in {self.name}" + (f" on {self.target}" if self.target else "")


@dataclass
class ProcessSnapshot(_Record):
    pid: int
    ppid: int | None
    rank: int | None
    role: str
    cmdline: list[str]
    state: str
    cpu_percent: float | None = None  # over the sampling interval; 100 = one full core
    kernel_state: str | None = None  # R, S, D (uninterruptible: often a hung filesystem), ...
    syscall: Syscall | None = None  # main thread's, when blocked in one
    session_id: int | None = None
    threads: list[ThreadStack] = field(default_factory=list)
    stack_error: str | None = None  # why there are no stacks (not Python, ptrace denied, ...)
    note: str | None = None
    fetching: str | None = None  # a DataLoader worker's dataset indices, while it fetches them

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcessSnapshot:
        return cls(
            pid=d["pid"],
            ppid=d.get("ppid"),
            rank=d.get("rank"),
            role=d["role"],
            cmdline=list(d.get("cmdline", [])),
            state=d["state"],
            cpu_percent=d.get("cpu_percent"),
            kernel_state=d.get("kernel_state"),
            syscall=Syscall.from_json(d.get("syscall")),
            session_id=d.get("session_id"),
            threads=[ThreadStack.from_json(t) for t in d.get("threads", [])],
            stack_error=d.get("stack_error"),
            note=d.get("note"),
            fetching=d.get("fetching"),
        )

    @property
    def main_thread(self) -> ThreadStack | None:
        for t in self.threads:
            if t.is_main:
                return t
        return self.threads[0] if self.threads else None

    @property
    def label(self) -> str:
        rank = f"rank {self.rank}" if self.rank is not None else ""
        if self.role == "dataloader-worker":
            who = f"{rank} DataLoader worker".strip()
        else:
            who = rank or ("main process" if self.role == "rank" else self.role)
        return f"{who} (pid {self.pid})"


@dataclass
class StackGroup(_Record):
    """Ranks whose main threads stand at the same innermost frame of the user's own code."""

    location: str
    ranks: list[int]
    pids: list[int]
    frames: list[Frame]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StackGroup:
        return cls(d["location"], list(d["ranks"]), list(d["pids"]),
                   [Frame.from_json(f) for f in d["frames"]])


@dataclass
class TreeNode(_Record):
    """A node of the merged prefix tree of main-thread stacks, STAT-style."""

    frame: Frame | None  # None at the root
    ranks: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    children: list[TreeNode] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TreeNode:
        return cls(
            frame=Frame.from_json(d["frame"]) if d.get("frame") else None,
            ranks=list(d.get("ranks", [])),
            pids=list(d.get("pids", [])),
            children=[TreeNode.from_json(c) for c in d.get("children", [])],
        )


@dataclass
class Diagnosis(_Record):
    kind: str  # a catalogue id (TD-01, DL-01, ...) or a short name
    summary: str
    advice: str
    ranks: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Diagnosis:
        return cls(d["kind"], d["summary"], d["advice"], list(d.get("ranks", [])),
                   list(d.get("pids", [])))


@dataclass
class CollectiveState(_Record):
    """The collective a rank is in, or last finished, as counted by hangkit.instrument()."""

    library: str  # "torch" or "mpi"
    comm: str  # "world", or the group's ranks / communicator's name
    op: str
    seq: int  # per library and communicator, from 1: the n-th collective this rank called there
    inside: bool
    seconds: float = 0.0  # how long it has been inside, when inside

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> CollectiveState | None:
        return cls(**d) if d else None

    def describe(self) -> str:
        return f"{self.op} #{self.seq}" + ("" if self.comm == "world" else f" on {self.comm}")


@dataclass
class Beat(_Record):
    """What a rank's agent publishes about once a second: its latest progress."""

    pid: int
    host: str
    rank: int | None = None
    world_size: int | None = None
    step: int | None = None
    phase: str | None = None
    phase_seconds: float = 0.0  # time in the current phase, when sent
    calls: int = 0  # progress() calls so far: any call counts as advancing
    since_progress: float = 0.0  # seconds since calls last changed, when sent
    fields: dict[str, Any] = field(default_factory=dict)
    collective: CollectiveState | None = None
    collective_seconds: float = 0.0  # total time spent inside collectives
    dump_file: str | None = None  # where a faulthandler dump lands on dump_signal
    dump_signal: int | None = None
    main_ident: int | None = None  # the main thread's id, to find it in a faulthandler dump
    error: str | None = None  # the last line of an exception that ended the rank's work
    extra: dict[str, Any] = field(default_factory=dict)  # hangkit.agent.publish()'s state
    sent_at: float = 0.0  # the sender's time.time()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Beat:
        # Fields a newer agent may add are ignored; the set is built once (2,240 beats a second).
        d = {k: v for k, v in d.items() if k in _BEAT_FIELDS}
        d["collective"] = CollectiveState.from_json(d.get("collective"))
        return cls(**d)


_BEAT_FIELDS = frozenset(f.name for f in dataclasses.fields(Beat))


@dataclass
class RankStatus(_Record):
    """The monitor's view of one rank at one moment: what dashboards and reports show."""

    key: str  # "rank 3", or "pid 1234" for a process without a rank
    rank: int | None
    pid: int
    host: str
    status: str  # running, idle, waiting, slow, stalled, dead, errored, finished
    step: int | None = None
    phase: str | None = None
    phase_seconds: float = 0.0
    since_progress: float = 0.0
    beat_age: float = 0.0
    step_rate: float | None = None  # steps per second over the recent window
    collective: CollectiveState | None = None
    straggler_score: float | None = None  # work per step against the other ranks' median
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the rank publish()ed

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankStatus:
        d = dict(d)
        d["collective"] = CollectiveState.from_json(d.get("collective"))
        return cls(**d)


@dataclass
class StallEvent(_Record):
    """One finding of stall detection: stall, stopped, dead, straggler or desync."""

    kind: str
    summary: str
    ranks: list[int] = field(default_factory=list)  # the ranks it is about (the culprits)
    at: float = 0.0  # the detector's clock
    scores: dict[str, float] = field(default_factory=dict)  # straggler scores by rank
    case: str | None = None  # the hang catalogue's id, where one applies (TD-02, MP-02)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StallEvent:
        return cls(**d)


PROBE_STATUSES = ("ok", "warn", "fail", "timeout", "skipped")


@dataclass
class ProbeResult(_Record):
    """One doctor probe's finding on one rank (rank None: this process's environment)."""

    name: str
    rank: int | None
    status: str  # one of PROBE_STATUSES
    seconds: float
    detail: str
    advice: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # figures behind the detail

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProbeResult:
        return cls(d["name"], d.get("rank"), d["status"], d.get("seconds", 0.0),
                   d.get("detail", ""), d.get("advice"), dict(d.get("data") or {}))


@dataclass
class HangReport(_Record):
    hang: bool
    reason: str
    command: list[str]
    idle_seconds: float
    detector: str = "output"
    started_at: str | None = None
    captured_at: str | None = None
    capture_seconds: float | None = None
    processes: list[ProcessSnapshot] = field(default_factory=list)
    groups: list[StackGroup] = field(default_factory=list)
    tree: TreeNode = field(default_factory=lambda: TreeNode(frame=None))
    diagnosis: list[Diagnosis] = field(default_factory=list)
    last_lines: list[str] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    ranks: list[RankStatus] = field(default_factory=list)  # from the ranks' agents, if any
    events: list[StallEvent] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HangReport:
        return cls(
            hang=d["hang"],
            reason=d["reason"],
            command=list(d["command"]),
            idle_seconds=d["idle_seconds"],
            detector=d.get("detector", "output"),
            started_at=d.get("started_at"),
            captured_at=d.get("captured_at"),
            capture_seconds=d.get("capture_seconds"),
            processes=[ProcessSnapshot.from_json(p) for p in d.get("processes", [])],
            groups=[StackGroup.from_json(g) for g in d.get("groups", [])],
            tree=TreeNode.from_json(d["tree"]) if d.get("tree") else TreeNode(frame=None),
            diagnosis=[Diagnosis.from_json(x) for x in d.get("diagnosis", [])],
            last_lines=list(d.get("last_lines", [])),
            context=dict(d.get("context", {})),
            ranks=[RankStatus.from_json(r) for r in d.get("ranks", [])],
            events=[StallEvent.from_json(e) for e in d.get("events", [])],
        )
