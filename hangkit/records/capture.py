"""What a capture holds: stacks, processes, their Flight Recorder dumps, nodes; what is made of
them (groups, the merged tree, diagnoses); the looks before a verdict; and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hangkit.records.base import (
    SCHEMA,
    Activity,
    ProcessState,
    Record,
    Role,
    conform,
    parse_enum,
)
from hangkit.records.progress import RankStatus, StallEvent
from hangkit.text import format_ranks


@dataclass
class Frame(Record):
    """One stack frame. `native` frames come from C libraries (py-spy --native)."""

    function: str
    file: str
    line: int | None = None
    native: bool = False
    # The line's source text, read on the node where the process runs, where another node's
    # files (a notebook engine's cell in its /tmp) cannot be read.
    code: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Frame:
        return cls(**cls._known(d))

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass
class ThreadStack(Record):
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
        d = cls._known(d)
        d.setdefault("name", None)
        d["frames"] = [Frame.from_json(f) for f in d.get("frames", [])]
        return cls(**d)


@dataclass
class Syscall(Record):
    """What the kernel says a blocked thread is doing: the syscall, and what it waits on."""

    name: str
    number: int
    target: str | None = None  # the file, socket or pipe behind the fd, or the path being opened
    target_kind: str | None = None  # "file", "fifo" (a named pipe), "pipe", "socket", "other"

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Syscall | None:
        return cls(**cls._known(d)) if d else None

    def describe(self) -> str:
        return f"in {self.name}" + (f" on {self.target}" if self.target else "")


@dataclass
class ProcessSnapshot(Record):
    pid: int
    ppid: int | None
    rank: int | None
    role: Role
    cmdline: list[str]
    state: ProcessState
    cpu_percent: float | None = None  # over the sampling interval; 100 = one full core
    kernel_state: str | None = None  # R, S, D (uninterruptible: often a hung filesystem), ...
    syscall: Syscall | None = None  # main thread's, when blocked in one
    session_id: int | None = None
    threads: list[ThreadStack] = field(default_factory=list)
    stack_error: str | None = None  # why there are no stacks (not Python, ptrace denied, ...)
    note: str | None = None
    fetching: str | None = None  # a DataLoader worker's dataset indices, while it fetches them
    recording: Recording | None = None  # a rank's Flight Recorder dump, from its agent
    stacks_from: str | None = None  # "agent", "faulthandler" or "py-spy": who gave the stacks
    host: str | None = None  # the node it runs on (pids are per node)
    no_agent: str | None = None  # why this rank had no agent, where hangkit was told
    age: float | None = None  # seconds since it started, at capture

    def __post_init__(self):  # so that code and tests may pass the plain words
        self.role = parse_enum(Role, self.role, Role.OTHER)
        self.state = parse_enum(ProcessState, self.state, ProcessState.UNREADABLE)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcessSnapshot:
        d = cls._known(d)
        for name in ("ppid", "rank", "role", "state"):
            d.setdefault(name, None)
        d["cmdline"] = list(d.get("cmdline", []))
        d["syscall"] = Syscall.from_json(d.get("syscall"))
        d["threads"] = [ThreadStack.from_json(t) for t in d.get("threads", [])]
        d["recording"] = Recording.from_json(d.get("recording"))
        return cls(**d)

    @property
    def main_thread(self) -> ThreadStack | None:
        for t in self.threads:
            if t.is_main:
                return t
        return self.threads[0] if self.threads else None

    @property
    def label(self) -> str:
        rank = f"rank {self.rank}" if self.rank is not None else ""
        if self.role == Role.DATALOADER_WORKER:
            who = f"{rank} DataLoader worker".strip()
        else:
            who = rank or ("main process" if self.role == Role.RANK else self.role)
        return f"{who} (pid {self.pid})"


@dataclass
class Recording(Record):
    """One rank's dump of torch's Flight Recorder: every collective of every process group it
    still holds, in torch's own format (flight_recorder/dumps.py reads it), so that torch's
    analyzer reads it too. `pg_config` there is completed by hangkit: gloo leaves it empty."""

    rank: int
    dump: dict[str, Any] = field(default_factory=dict)  # empty when there is none: see error
    source: str = "agent"  # "agent", or the file it was read from
    error: str | None = None  # why there is no dump

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Recording | None:
        return cls(**cls._known(d)) if d else None


@dataclass
class NodeReport(Record):
    """One node of a job whose ranks run under `hangkit rank`, as its capture went: whether
    its relay answered in time, and what it sent."""

    host: str
    ranks: list[int] = field(default_factory=list)
    relay_pid: int | None = None
    answered: bool = False
    seconds: float | None = None  # how long its capture took, on the node
    processes: int = 0  # snapshots it sent
    note: str | None = None  # why it did not answer; shims that did not

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeReport:
        return cls(**cls._known(d))

    def describe(self) -> str:
        """'hknode1 (ranks 2,3): 6 processes in 1.2 s', 'hknode1 (ranks 2,3): did not answer
        within 5 s: its relay (pid 71) was last heard 12 s ago'."""
        head = self.host + (f" (ranks {format_ranks(self.ranks)})" if self.ranks else "")
        if not self.answered:
            return f"{head}: {self.note or 'did not answer'}"
        took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
        return f"{head}: {self.processes} processes{took}" + (
            f"; {self.note}" if self.note else "")


@dataclass
class StackGroup(Record):
    """Ranks whose main threads stand at the same innermost frame of the user's own code."""

    location: str
    ranks: list[int]
    pids: list[int]
    frames: list[Frame]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StackGroup:
        return cls(d["location"], list(d.get("ranks", [])), list(d.get("pids", [])),
                   [Frame.from_json(f) for f in d.get("frames", [])])


@dataclass
class TreeNode(Record):
    """A node of the merged prefix tree of main-thread stacks, STAT-style."""

    frame: Frame | None  # None at the root
    ranks: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    children: list[TreeNode] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TreeNode:
        # Without recursion: a tree nests as deep as the deepest stack (hundreds of frames).
        root = cls._one(d)
        todo = [(root, d.get("children", []))]
        while todo:
            node, children = todo.pop()
            for c in children:
                node.children.append(child := cls._one(c))
                todo.append((child, c.get("children", [])))
        return root

    @classmethod
    def _one(cls, d: dict[str, Any]) -> TreeNode:
        return cls(frame=Frame.from_json(d["frame"]) if d.get("frame") else None,
                   ranks=list(d.get("ranks", [])), pids=list(d.get("pids", [])))


@dataclass
class Diagnosis(Record):
    kind: str  # a catalogue id (TD-01, DL-01, ...) or a short name
    summary: str
    advice: str
    ranks: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Diagnosis:
        return cls(d["kind"], d["summary"], d.get("advice", ""), list(d.get("ranks", [])),
                   list(d.get("pids", [])))


@dataclass
class ProcessLook(Record):
    """One process over one confirmation window: how hangkit judged it, and from what."""

    pid: int
    rank: int | None
    role: Role
    activity: Activity
    where: str  # where its main thread was last seen, in the user's terms
    cpu_percent: float | None = None  # over the window; 100 = one full core
    stacks: list[str] = field(default_factory=list)  # the innermost frame of each sample
    distinct: int = 0  # how many different stacks the samples showed

    def __post_init__(self):
        self.role = parse_enum(Role, self.role, Role.OTHER)
        self.activity = parse_enum(Activity, self.activity, Activity.WAITING)

    @property
    def deciding(self) -> bool:
        """A rank or a DataLoader worker: whose activity decides whether the job progresses
        (a launcher or a rank's helper process does not)."""
        return self.role in (Role.RANK, Role.DATALOADER_WORKER)

    @property
    def key(self) -> str:
        """As RankStatus.key spells it: "rank 3", or "pid 1234" without a rank."""
        return f"rank {self.rank}" if self.rank is not None else f"pid {self.pid}"

    @property
    def label(self) -> str:
        """'rank 2', 'rank 2 DataLoader worker (pid 9)'."""
        if self.role == Role.DATALOADER_WORKER:
            return f"{self.key} DataLoader worker (pid {self.pid})"
        return self.key

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcessLook:
        d = cls._known(d)
        for name in ("rank", "role", "activity"):
            d.setdefault(name, None)
        d.setdefault("where", "")
        return cls(**d)


@dataclass
class Look(Record):
    """One look at every process of the job before anything is called a hang."""

    at: float  # seconds of silence (or of no progress) when the look began
    seconds: float  # how long the look took, its samples and its capture
    samples: int  # stack samples per process
    processes: list[ProcessLook] = field(default_factory=list)
    verdict: str = ""  # what was decided: "hung", "progressing", "ceiling"
    capture_seconds: float = 0.0  # of `seconds`, the capture's: the rest is what looking adds
    cpu_seconds: float = 0.0  # CPU it cost this process and its children (py-spy)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Look:
        d = cls._known(d)
        d["processes"] = [ProcessLook.from_json(p) for p in d.get("processes", [])]
        d.setdefault("at", 0.0)
        d.setdefault("seconds", 0.0)
        d.setdefault("samples", 0)
        return cls(**d)


@dataclass
class HangReport(Record):
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
    looks: list[Look] = field(default_factory=list)  # what was seen before it was called
    nodes: list[NodeReport] = field(default_factory=list)  # under `hangkit rank`: per node
    schema: int = SCHEMA

    @classmethod
    def from_json(cls, d: dict[str, Any], problems: list[str] | None = None) -> HangReport:
        """The report a JSON object holds. Read tolerantly (see hangkit.records), and a field
        of the wrong type, at any depth, reads as its default (base.conform): each is named
        in `problems` where a list is given, so that a reader can refuse the file or say
        what it could not show."""
        if not isinstance(d, dict):
            raise TypeError(f"a hang report is a JSON object, not {type(d).__name__}")
        d = conform(cls, d, [] if problems is None else problems)
        return cls(
            hang=d.get("hang", True),
            reason=d.get("reason", ""),
            command=list(d.get("command", [])),
            idle_seconds=d.get("idle_seconds", 0.0),
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
            looks=[Look.from_json(x) for x in d.get("looks", [])],
            nodes=[NodeReport.from_json(x) for x in d.get("nodes", [])],
            schema=d.get("schema", 0),
        )
