"""What progress beats carry, and what the monitor makes of them: a rank's collective, its
DataLoader workers, the beat itself, the rank's status, stall events; and the doctor's
findings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hangkit.records.base import RankState, Record, WorkerPhase, conform, parse_enum


@dataclass
class CollectiveState(Record):
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
class WorkerState(Record):
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
class Beat(Record):
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
        # The monitor reads thousands a second: the nested records only where there are any.
        d = cls._known(d)
        if d.get("collective") is not None:
            d["collective"] = CollectiveState.from_json(d["collective"])
        if d.get("workers"):
            d["workers"] = [WorkerState.from_json(w) for w in d["workers"]]
        return cls(**d)


@dataclass
class RankStatus(Record):
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
    exit: str | None = None  # how its process ended, as its shim saw it: "exited with code 1"

    def __post_init__(self):
        if type(self.status) is not RankState:  # the monitor makes thousands a second
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
        if not d.get("workers"):  # 0.1.0's untyped dicts: what a file holds, made fit first
            workers = [conform(WorkerState, w, [], fill=True) for w in workers
                       if isinstance(w, dict)] if isinstance(workers, list) else []
        d["workers"] = [WorkerState.from_json(w) for w in workers if isinstance(w, dict)]
        d["extra"] = extra
        return cls(**d)


@dataclass
class StallEvent(Record):
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
class ProbeResult(Record):
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
