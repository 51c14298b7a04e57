"""Records: the one language between layers.

Plain dataclasses with to_json()/from_json(). Capture produces them; the terminal summary, the
Markdown report, the JSON file and the widgets are pure functions of them.

Reading is tolerant, so that a report written by one version opens in the next: from_json
ignores keys it does not know, fills fields that are missing with their defaults, and reads a
value of an enum it does not know as that enum's fallback. HangReport and the doctor's JSON
carry SCHEMA, raised when a field changes meaning (not when one is added).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
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


class _Record:
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The keys of d that are fields of this record: a newer version's are ignored."""
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
        return {k: v for k, v in d.items() if k in names}


_FIELD_NAMES: dict[type, frozenset[str]] = {}


@dataclass
class Frame(_Record):
    """One stack frame. `native` frames come from C libraries (py-spy --native)."""

    function: str
    file: str
    line: int | None = None
    native: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Frame:
        return cls(**cls._known(d))

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
        d = cls._known(d)
        d.setdefault("name", None)
        d["frames"] = [Frame.from_json(f) for f in d.get("frames", [])]
        return cls(**d)


@dataclass
class Syscall(_Record):
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
class ProcessSnapshot(_Record):
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
class Recording(_Record):
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
class StackGroup(_Record):
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
        return cls(d["kind"], d["summary"], d.get("advice", ""), list(d.get("ranks", [])),
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
        return cls(**cls._known(d)) if d else None

    def describe(self) -> str:
        """'all_reduce #7', 'collective #8 on group 1' (an op the recorder's counters do not
        name)."""
        return f"{self.op or 'collective'} #{self.seq}" + (
            "" if self.comm == "world" else f" on {self.comm}")


@dataclass
class WorkerState(_Record):
    """One DataLoader worker, as its rank's safe DataLoader last read its slot and exit code."""

    worker: int  # torch's worker id, 0 .. num_workers - 1
    pid: int | None
    state: WorkerPhase
    index: int | None = None  # the dataset index it is fetching (a dead one: was fetching)
    since: float | None = None  # time.time() when that fetch began
    seconds: float | None = None  # how long it had been fetching when the state was read
    exit_code: int | None = None  # EXITED
    signal: int | None = None  # KILLED

    def __post_init__(self):
        self.state = parse_enum(WorkerPhase, self.state, WorkerPhase.IDLE)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WorkerState:
        d = cls._known(d)
        d.setdefault("pid", None)
        text = str(d.get("state") or "")
        # hangkit 0.1.0 wrote free text: "killed by signal 9", "exited with code 1".
        if text.startswith("killed"):
            d["state"] = WorkerPhase.KILLED
        elif text.startswith("exited"):
            d["state"] = WorkerPhase.EXITED
            code = text.rsplit(" ", 1)[-1]
            d.setdefault("exit_code", int(code) if code.isdigit() else 0)
        else:
            d["state"] = parse_enum(WorkerPhase, text, WorkerPhase.IDLE)
        return cls(**d)

    def describe(self) -> str:
        """'worker 1 (pid 502) fetching dataset index 17 for 33.0 s', 'worker 2 (pid 503)
        killed by signal 9 (SIGKILL) while fetching dataset index 29 (for 1.2 s)'."""
        head = f"worker {self.worker} (pid {self.pid})"
        fetch = f"dataset index {self.index}" if self.index is not None else "a batch"
        took = f"{self.seconds:.1f} s" if self.seconds is not None else None
        if self.state == WorkerPhase.FETCHING:
            return f"{head} fetching {fetch}" + (f" for {took}" if took else "")
        if self.state == WorkerPhase.KILLED:
            text = f"{head} killed by signal {self.signal} ({_signal_name(self.signal)})"
        elif self.state == WorkerPhase.EXITED:
            text = f"{head} exited" + (f" with code {self.exit_code}" if self.exit_code else "")
        else:
            return f"{head} {self.state}"
        if self.since is not None:  # it died inside the dataset
            text += f" while fetching {fetch}" + (f" (for {took})" if took else "")
        return text


def _signal_name(number: int | None) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except (ValueError, TypeError):
        return f"signal {number}"


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
    workers: list[WorkerState] = field(default_factory=list)  # its safe DataLoader's
    extra: dict[str, Any] = field(default_factory=dict)  # hangkit.agent.publish()'s state
    sent_at: float = 0.0  # the sender's time.time()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Beat:
        d = cls._known(d)
        d["collective"] = CollectiveState.from_json(d.get("collective"))
        d["workers"] = [WorkerState.from_json(w) for w in d.get("workers") or ()]
        return cls(**d)


@dataclass
class RankStatus(_Record):
    """The monitor's view of one rank at one moment: what dashboards and reports show."""

    key: str  # "rank 3", or "pid 1234" for a process without a rank
    rank: int | None
    pid: int
    host: str
    status: RankState
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
    workers: list[WorkerState] = field(default_factory=list)  # its DataLoader workers
    extra: dict[str, Any] = field(default_factory=dict)  # what the rank publish()ed

    def __post_init__(self):
        self.status = parse_enum(RankState, self.status, RankState.RUNNING)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankStatus:
        d = cls._known(d)
        d.setdefault("rank", None)
        d.setdefault("status", None)
        d["collective"] = CollectiveState.from_json(d.get("collective"))
        extra = dict(d.get("extra") or {})
        # hangkit 0.1.0 carried the workers as untyped dicts in extra.
        workers = d.get("workers") or extra.pop("dataloader_workers", None) or []
        d["workers"] = [WorkerState.from_json(w) for w in workers if isinstance(w, dict)]
        d["extra"] = extra
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
        return cls(**cls._known(d))


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
class ProcessLook(_Record):
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
class Look(_Record):
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
    looks: list[Look] = field(default_factory=list)  # what was seen before it was called
    schema: int = SCHEMA

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HangReport:
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
            schema=d.get("schema", 0),
        )
