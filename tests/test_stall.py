"""The collector and the stall detector, driven by a fake clock: no sockets, no waiting.

Every beat is built by hand the way an agent would send it, and fed with collector.ingest(msg,
now); the detector is stepped with step(now) at the fake times a test chooses.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import pytest

from hangkit.monitor.advice import ADVICE
from hangkit.monitor.collector import Collector, _median_without
from hangkit.monitor.diagnose import diagnose
from hangkit.monitor.stall import StallConfig, StallDetector
from hangkit.records import Beat, CollectiveState, StallEvent

HANGS = ("stall", "stopped")


def coll(op: str, seq: int, *, inside: bool = True, library: str = "torch",
         comm: str = "world") -> CollectiveState:
    return CollectiveState(library, comm, op, seq, inside=inside)


@dataclass
class FakeRank:
    """One rank's agent, as the monitor sees it: progress() calls and beats, in fake time."""

    rank: int
    world_size: int = 4
    pid: int = 0
    step: int | None = None
    phase: str | None = None
    calls: int = 0
    progressed_at: float = 0.0
    phase_since: float = 0.0
    collective: CollectiveState | None = None
    collective_seconds: float = 0.0
    error: str | None = None

    def __post_init__(self):
        self.pid = self.pid or 1000 + self.rank

    def progress(self, now: float, *, step: int | None = None, phase: str | None = None) -> None:
        self.calls += 1
        self.progressed_at = now
        if step is not None:
            self.step = step
        if phase is not None and phase != self.phase:
            self.phase, self.phase_since = phase, now

    def message(self, now: float, kind: str = "beat") -> dict:
        return {"type": kind, **Beat(
            pid=self.pid, host="h", rank=self.rank, world_size=self.world_size, step=self.step,
            phase=self.phase, phase_seconds=now - self.phase_since, calls=self.calls,
            since_progress=now - self.progressed_at, collective=self.collective,
            collective_seconds=self.collective_seconds, error=self.error, sent_at=0).to_json()}


class Job:
    """Fake ranks, a collector and a detector; beat() delivers every live rank's beat."""

    def __init__(self, n: int = 4, *, world_size: int | None = None, **config):
        self.ranks = [FakeRank(r, world_size=world_size or n) for r in range(n)]
        self.collector = Collector()
        self.detector = StallDetector(self.collector, StallConfig(**config))
        self.silent: set[int] = set()  # ranks whose beats no longer arrive

    def beat(self, now: float, ranks=None) -> None:
        for r in self.ranks if ranks is None else [self.ranks[i] for i in ranks]:
            if r.rank not in self.silent:
                self.collector.ingest(r.message(now), now)

    def bye(self, rank: int, now: float) -> None:
        self.collector.ingest(self.ranks[rank].message(now, kind="bye"), now)
        self.silent.add(rank)

    def step(self, now: float) -> list[StallEvent]:
        return self.detector.step(now)

    def run(self, start: float, stop: float, every: float = 1.0, advance=None
            ) -> list[StallEvent]:
        """Beats and steps at start, start + every, ... up to stop (inclusive); advance(t) runs
        first at each tick. Returns every new event, in order."""
        events, ticks = [], round((stop - start) / every)
        for i in range(ticks + 1):
            t = round(start + i * every, 6)
            if advance is not None:
                advance(t)
            self.beat(t)
            events += self.step(t)
        return events

    def status(self, now: float) -> dict[int, str]:
        return {s.rank: s.status for s in self.detector.statuses(now)}


def kinds(events: list[StallEvent]) -> list[tuple[str, list[int]]]:
    return [(e.kind, e.ranks) for e in events]


def of_kind(events: list[StallEvent], *wanted: str) -> list[StallEvent]:
    return [e for e in events if e.kind in wanted]


def train_together(job: Job, until: float) -> None:
    """Every rank advances one step a second from 0 to `until`."""

    def advance(t):
        for r in job.ranks:
            r.progress(t, step=int(t), phase="train")

    events = job.run(0, until, advance=advance)
    assert not events, f"no event expected while every rank advances: {kinds(events)}"


# Global stall: one rank stopped outside the collective the others wait in


def enter_td01(job: Job, t: float, seq: int) -> None:
    """Ranks 0, 1, 3 enter all_reduce #seq; rank 2 stays in phase 'data', outside it."""
    for r in job.ranks:
        if r.rank == 2:
            r.progress(t, phase="data")
            r.collective = coll("all_reduce", seq - 1, inside=False)
        else:
            r.progress(t, phase="sync")
            r.collective = coll("all_reduce", seq)


def test_global_stall_names_the_rank_outside_the_collective_once():
    stall_after = 30.0
    job = Job(4, stall_after=stall_after)
    train_together(job, 10)
    enter_td01(job, 10, 41)

    before = job.run(11, 10 + stall_after - 1)
    assert not of_kind(before, *HANGS), f"reported before {stall_after} s: {kinds(before)}"

    job.beat(10 + stall_after)
    events = job.step(10 + stall_after)
    assert kinds(events) == [("stall", [2])], [e.to_json() for e in events]
    summary = events[0].summary
    assert summary.startswith(f"no rank advanced for {stall_after:.0f} s: "), summary
    assert "rank 2 in phase 'data'" in summary, summary
    assert "at step 10" in summary, summary
    assert "not in a collective (last: all_reduce #40)" in summary, summary
    assert "ranks 0,1,3 wait in all_reduce #41" in summary, summary
    assert job.status(10 + stall_after) == {0: "waiting", 1: "waiting", 2: "stalled",
                                           3: "waiting"}

    later = job.run(11 + stall_after, 20 + stall_after)
    assert later == [], f"a stall is reported once: {kinds(later)}"
    assert [e.kind for e in job.detector.active.values()] == ["stall"]

    # The ranks advance again: the stall clears...
    resume = 21 + stall_after

    def advance(t):
        for r in job.ranks:
            r.progress(t, step=int(t), phase="train")
            r.collective = coll("all_reduce", 41, inside=False)

    cleared = job.run(resume, resume + 3, advance=advance)
    assert not of_kind(cleared, *HANGS), kinds(cleared)
    assert not of_kind(list(job.detector.active.values()), *HANGS), job.detector.active

    # ...and when they stall again, it is news again.
    enter_td01(job, resume + 4, 42)
    again = job.run(resume + 5, resume + 4 + stall_after)
    assert kinds(again) == [("stall", [2])], [e.to_json() for e in again]
    assert "ranks 0,1,3 wait in all_reduce #42" in again[0].summary, again[0].summary


def test_stopped_names_exactly_the_ranks_that_stopped_while_others_advance():
    job = Job(4, stall_after=10.0)
    train_together(job, 5)

    def advance(t):  # ranks 0 and 2 go on; ranks 1 and 3 stopped at t=5
        for r in (job.ranks[0], job.ranks[2]):
            r.progress(t, step=int(t), phase="train")

    job.ranks[1].phase = job.ranks[3].phase = "eval"
    events = job.run(6, 25, advance=advance)
    stopped = of_kind(events, *HANGS)
    assert kinds(stopped) == [("stopped", [1, 3])], [e.to_json() for e in events]
    assert stopped[0].at == 15, "reported when 10 s without progress had passed"
    summary = stopped[0].summary
    assert summary.startswith("ranks 1,3 stopped advancing: rank 1 in phase 'eval'"), summary
    assert summary.endswith("; ranks 0,2 still advance"), summary
    assert job.status(25)[1] == "stalled" and job.status(25)[0] == "running"


# Dead, finished, errored


def test_a_rank_whose_beats_stop_is_dead_after_dead_after():
    job = Job(3, dead_after=5.0, stall_after=60.0)
    train_together(job, 3)
    job.silent.add(1)

    def advance(t):
        for r in job.ranks:
            r.progress(t, step=int(t), phase="train")

    early = job.run(4, 7.9, every=0.1, advance=advance)
    assert not of_kind(early, "dead"), kinds(early)
    events = job.run(8, 12, advance=advance)
    assert kinds(of_kind(events, "dead")) == [("dead", [1])], [e.to_json() for e in events]
    dead = of_kind(events, "dead")[0]
    assert dead.at == 8
    assert dead.summary.startswith("rank 1 is dead: no beat for 5 s (process 1001 on h"), \
        dead.summary
    assert "last seen in phase 'train' at step 3" in dead.summary, dead.summary
    assert job.status(12)[1] == "dead"


def test_mark_gone_is_dead_at_once_and_says_exited():
    job = Job(3, dead_after=5.0)
    train_together(job, 3)
    job.silent.add(2)
    job.collector.mark_gone("rank 2")
    events = job.step(3)  # the same moment: no beat has been missed yet
    assert kinds(events) == [("dead", [2])], [e.to_json() for e in events]
    assert "exited" in events[0].summary, events[0].summary
    assert "process 1002 on h exited" in events[0].summary, events[0].summary
    assert job.status(3) == {0: "running", 1: "running", 2: "dead"}


def test_bye_is_finished_never_dead_and_bye_with_error_is_errored():
    job = Job(3, dead_after=5.0, stall_after=20.0)
    train_together(job, 3)
    job.bye(0, 3)
    job.ranks[1].error = "RuntimeError: CUDA out of memory"
    job.bye(1, 3)
    job.collector.mark_gone("rank 0")  # its process exits after saying goodbye
    job.collector.mark_gone("rank 1")

    def advance(t):
        job.ranks[2].progress(t, step=int(t), phase="train")

    events = job.run(4, 40, advance=advance)
    assert events == [], [e.to_json() for e in events]
    assert job.status(40) == {0: "finished", 1: "errored", 2: "running"}
    errored = [s for s in job.detector.statuses(40) if s.rank == 1][0]
    assert errored.error == "RuntimeError: CUDA out of memory"


# Stragglers


def straggler_events(job: Job, advance, until: float = 8) -> list[StallEvent]:
    events = job.run(0, until, advance=advance)
    return of_kind(events, "straggler")


def assert_rank_1_straggles(events: list[StallEvent]) -> None:
    assert kinds(events) == [("straggler", [1])], [e.to_json() for e in events]
    scores = events[0].scores
    assert scores["rank 1"] >= 2, scores
    for key in ("rank 0", "rank 2", "rank 3"):
        assert scores[key] == pytest.approx(1.0, abs=0.15), scores
    assert events[0].summary.startswith("rank 1 is a straggler: "), events[0].summary


def test_straggler_by_step_rate():
    job = Job(4)

    def advance(t):  # rank 1 needs four times the work per step: a quarter of the steps
        for r in job.ranks:
            r.progress(t, step=int(t) * (1 if r.rank == 1 else 4), phase="train")

    events = straggler_events(job, advance)
    assert_rank_1_straggles(events)
    assert events[0].scores["rank 1"] == pytest.approx(4.0, rel=0.05)
    assert job.status(8) == {0: "running", 1: "slow", 2: "running", 3: "running"}


def test_straggler_by_time_outside_collectives_at_the_same_step_rate():
    # Synchronous training: every rank takes a step a second, but ranks 0, 2, 3 spend 0.8 s of
    # it inside collectives waiting for rank 1, which spends 0.1 s there.
    job = Job(4)

    def advance(t):
        for r in job.ranks:
            r.progress(t, step=int(t), phase="train")
            r.collective_seconds = t * (0.1 if r.rank == 1 else 0.8)
            r.collective = coll("all_reduce", int(t), inside=False)

    events = straggler_events(job, advance)
    assert_rank_1_straggles(events)
    rates = {s.rank: s.step_rate for s in job.detector.statuses(8)}
    assert len(set(rates.values())) == 1, f"same step rate everywhere: {rates}"


def test_no_straggler_when_ranks_work_alike():
    job = Job(4)

    def advance(t):
        for r in job.ranks:
            r.progress(t, step=int(t) * 3, phase="train")

    assert straggler_events(job, advance) == []
    scores = {s.key: s.straggler_score for s in job.detector.statuses(8)}
    assert scores == pytest.approx({f"rank {r}": 1.0 for r in range(4)}), scores


# Desync: ranks inside different collectives (TD-02, MP-02)


def desync_job(ops: dict[int, tuple[str, int]], library: str = "torch") -> Job:
    job = Job(4, desync_after=2.0)
    for rank, (op, seq) in ops.items():
        job.ranks[rank].progress(0, step=7, phase="sync")
        job.ranks[rank].collective = coll(op, seq, library=library)
    return job


def run_desync(job: Job, times) -> list[tuple[float, StallEvent]]:
    found = []
    for t in times:
        job.beat(t)
        found += [(t, e) for e in job.step(t)]
    return found


TD02 = {0: ("all_reduce", 41), 1: ("all_reduce", 41), 2: ("broadcast", 41),
        3: ("all_reduce", 41)}


@pytest.mark.parametrize("library, case", [("torch", "TD-02"), ("mpi", "MP-02")])
def test_desync_in_different_collectives_after_desync_after(library, case):
    job = desync_job(TD02, library)
    found = run_desync(job, [0, 0.5, 1.0, 1.5, 1.9])
    assert found == [], f"nothing before desync_after: {[(t, e.to_json()) for t, e in found]}"
    found = run_desync(job, [2.0, 2.5, 3.0, 10.0])
    assert [(t, e.kind, e.ranks, e.case) for t, e in found] == [(2.0, "desync", [2], case)], \
        [(t, e.to_json()) for t, e in found]
    assert found[0][1].summary == "rank 2 is in broadcast #41; ranks 0,1,3 are in all_reduce #41"


def test_desync_by_one_sequence_number():
    job = desync_job({0: ("all_reduce", 41), 1: ("all_reduce", 41), 2: ("all_reduce", 40),
                      3: ("all_reduce", 41)})
    found = run_desync(job, [0, 1, 2, 3])
    assert [(t, e.kind, e.ranks, e.case) for t, e in found] == [(2, "desync", [2], "TD-02")]
    assert found[0][1].summary == "rank 2 is in all_reduce #40; ranks 0,1,3 are in all_reduce #41"


def test_a_transient_desync_is_not_reported_and_its_clock_restarts():
    job = desync_job(TD02)
    assert run_desync(job, [0, 0.5, 1.0, 1.5]) == []
    job.ranks[2].collective = coll("all_reduce", 41)  # it catches up
    assert run_desync(job, [1.9, 2.5, 3.0]) == []
    for r in job.ranks:  # the next collective: a transient split again, from t=3.5
        r.collective = coll("broadcast" if r.rank == 2 else "all_reduce", 42)
    found = run_desync(job, [3.5, 4.5, 5.4])
    assert found == [], "a new split is timed from when it was first seen, not from t=0"
    found = run_desync(job, [5.5, 6.0])
    assert [(t, e.kind, e.ranks) for t, e in found] == [(5.5, "desync", [2])]


# Ranks that never reported


def test_stall_names_a_rank_that_never_reported():
    job = Job(3, world_size=4, stall_after=20.0)
    train_together(job, 3)
    for r in job.ranks:
        r.progress(4, phase="sync")
        r.collective = coll("all_reduce", 5)
    events = of_kind(job.run(5, 30), *HANGS)
    assert kinds(events) == [("stall", [3])], [e.to_json() for e in events]
    assert events[0].at == 24
    assert events[0].summary == ("no rank advanced for 20 s: ranks 0-2 wait in all_reduce #5; "
                                 "rank 3 never reported progress")


# From events to the report's diagnosis


def detected(job: Job, times, kind: str) -> StallEvent:
    events = [e for _, e in run_desync(job, times) if e.kind == kind]
    assert len(events) == 1, [e.to_json() for e in events]
    return events[0]


@pytest.mark.parametrize("library, case", [("torch", "TD-02"), ("mpi", "MP-02")])
def test_diagnose_turns_a_desync_event_into_its_case(library, case):
    event = detected(desync_job(TD02, library), [0, 1, 2, 3], "desync")
    assert StallEvent.from_json(event.to_json()) == event
    found = diagnose(processes=[], events=[event])
    assert [(d.kind, d.ranks) for d in found] == [(case, [2])], [d.to_json() for d in found]
    assert found[0].summary == ("Ranks are in different collectives: rank 2 is in broadcast #41; "
                                "ranks 0,1,3 are in all_reduce #41")
    assert found[0].advice == ADVICE[case]


def test_diagnose_turns_a_dead_event_into_dead_rank():
    job = Job(3, dead_after=5.0)
    train_together(job, 3)
    job.silent.add(1)  # its process exited: no more beats
    job.collector.mark_gone("rank 1")
    event = detected(job, [3], "dead")
    found = diagnose(processes=[], events=[event])
    assert [(d.kind, d.ranks) for d in found] == [("dead-rank", [1])], [d.to_json() for d in found]
    assert found[0].summary == event.summary


def test_median_of_the_others_matches_the_plain_median():
    rng = random.Random(7)
    for _ in range(500):
        count = rng.randint(2, 9)
        values = sorted(rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(count))
        i = rng.randrange(len(values))
        assert _median_without(values, i) == statistics.median(values[:i] + values[i + 1:])


def test_idle_ranks_are_never_stalled_and_do_not_hide_a_stall_of_the_others():
    # MPI engines between notebook cells report phase "idle": waiting by intent.
    job = Job(stall_after=5.0)
    for r in job.ranks:
        r.progress(0.0, step=3, phase="idle")
    assert of_kind(job.run(0, 30), *HANGS) == []
    assert set(job.status(30).values()) == {"idle"}
    # Two ranks go back to work and stop outside any collective: they are the stall.
    for i in (0, 1):
        job.ranks[i].progress(31.0, step=4, phase="forward")
    events = of_kind(job.run(31, 40), *HANGS)
    assert [e.ranks for e in events] == [[0, 1]]
    assert job.status(40) == {0: "stalled", 1: "stalled", 2: "idle", 3: "idle"}


def test_a_rank_a_look_saw_progressing_is_busy_not_stalled_until_that_is_old():
    """The classes watch decides by, in the monitor: a silent rank whose stack a look saw
    moving reads busy; while it does, its peers waiting for it are no stall; after stall_after
    without another look saying so, it is judged (and reported) again."""
    stall_after = 10.0
    job = Job(4, stall_after=stall_after)
    train_together(job, 10)
    enter_td01(job, 10, 41)  # rank 2 leaves the loop; ranks 0,1,3 wait for it
    seen = 10 + stall_after - 1
    job.run(11, seen)
    job.collector.mark_progressing("rank 2", seen)  # a look: its stack keeps moving
    busy = job.run(seen + 1, seen + stall_after - 1)
    assert not of_kind(busy, *HANGS), kinds(busy)
    assert job.status(seen + 2) == {0: "waiting", 1: "waiting", 2: "busy", 3: "waiting"}
    later = job.run(seen + stall_after, seen + stall_after + 1)
    assert kinds(later) == [("stall", [2])], [e.to_json() for e in later]
    assert job.status(seen + stall_after) == {0: "waiting", 1: "waiting", 2: "stalled",
                                              3: "waiting"}


def test_auto_stall_after_is_five_times_the_high_step_interval_with_a_floor():
    job = Job(2, stall_after=3.0, auto=True)  # stall_after is the floor
    assert job.detector.config.stall_after_now(job.collector) == float("inf")  # no steps yet

    def steps_every(seconds: float, start: float, count: int) -> float:
        t = start
        for i in range(count):
            for r in job.ranks:
                r.progress(t, step=i, phase="train")
            job.beat(t)
            t += seconds
        return t

    t = steps_every(0.4, 0.0, 12)  # 0.4 s steps: 5 x 0.4 = 2 s, under the floor
    assert job.detector.config.stall_after_now(job.collector) == 3.0
    t = steps_every(2.0, t, 12)  # slower steps: 5 x 2 s
    assert job.detector.config.stall_after_now(job.collector) == pytest.approx(10.0)
    quiet = job.run(t - 1, t + 6)  # up to 8 s since the last step (at t - 2): not yet
    assert not of_kind(quiet, *HANGS), kinds(quiet)
    events = job.run(t + 7, t + 10)  # past 10 s: a stall, judged by the step times
    assert of_kind(events, "stall"), kinds(events)
