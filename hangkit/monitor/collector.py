"""The collector: per-rank state built from the agents' beats. No I/O and no clock of its own:
every method takes `now`, so the monitor's thread, the watcher and tests drive it alike."""

from __future__ import annotations

import bisect
import dataclasses
from collections import deque
from dataclasses import dataclass, field

from hangkit.batches import beats
from hangkit.records import Beat, RankState, RankStatus

# Step rates and work per step are measured over the beats of this many recent seconds.
WINDOW = 10.0
INTERVALS = 100  # step intervals kept per rank, for --progress-timeout auto


@dataclass
class Track:
    """Everything the monitor knows about one rank."""

    key: str
    beat: Beat
    identity: bytes  # where requests for this rank go
    last_beat: float  # when the latest beat arrived
    advanced_at: float  # when the rank last called progress(), in the monitor's clock
    finished: bool = False  # said goodbye
    progressing_at: float | None = None  # when a look last saw its stack progressing
    step_at: float | None = None  # when its step last changed
    intervals: deque = field(default_factory=lambda: deque(maxlen=INTERVALS))  # between them
    gone: bool = False  # its process is known to have exited without saying goodbye
    history: deque = field(default_factory=lambda: deque(maxlen=64))  # (t, step, coll_seconds)
    relayed: bool = False  # its beats come through its node's relay
    alive: bool | None = None  # what its shim last said of its process (None: no shim)
    exit: str | None = None  # how its process ended, as its shim saw it: "exited with code 1"

    @property
    def rank(self) -> int | None:
        return self.beat.rank

    def rate_and_work(self) -> tuple[float | None, float | None]:
        """Steps per second, and seconds of work (time outside collectives) per step, over the
        window; None without two beats that differ in step."""
        if len(self.history) < 2:
            return None, None
        (t0, s0, c0), (t1, s1, c1) = self.history[0], self.history[-1]
        if not isinstance(s0, int | float) or not isinstance(s1, int | float) or s1 <= s0:
            return (0.0, None) if t1 > t0 and s1 == s0 else (None, None)
        steps = s1 - s0
        return steps / (t1 - t0), max((t1 - t0) - (c1 - c0), 0.0) / steps


@dataclass
class Node:
    """A node whose relay reports (hangkit rank): its batches, and the shims of its ranks."""

    host: str
    identity: bytes  # where requests for the node, and for its ranks, go
    relay_pid: int | None
    last_heard: float
    shims: dict[str, dict] = field(default_factory=dict)  # rank key: the relay's shim record
    batches: int = 0
    columns: list[str] = field(default_factory=list)  # of its batches' rows, as last sent

    def ranks(self) -> list[int]:
        return sorted(s["rank"] for s in self.shims.values() if isinstance(s.get("rank"), int))


def key_of(beat: Beat) -> str:
    return f"rank {beat.rank}" if beat.rank is not None else f"pid {beat.pid}"


def exit_text(code: int | None, signum: int | None) -> str:
    """'exited with code 1', 'was killed by signal 9 (SIGKILL)'."""
    if signum:
        import signal

        try:
            name = f" ({signal.Signals(signum).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {signum}{name}"
    return f"exited with code {code}"


class Collector:
    def __init__(self):
        self.tracks: dict[str, Track] = {}
        self._ordered: list[Track] | None = None  # the tracks by rank, for statuses()
        self.nodes: dict[str, Node] = {}
        self.world_size: int | None = None
        self.beats = 0

    def ingest_batch(self, message: dict, now: float, identity: bytes = b"") -> Node | None:
        """A verified batch from a node's relay: its ranks' beats, and its shims."""
        host = message.get("host")
        if not isinstance(host, str):
            return None
        node = self.nodes.get(host)
        if node is None or node.identity != identity:
            node = self.nodes[host] = Node(host, identity, message.get("relay_pid"), now)
        node.last_heard, node.relay_pid = now, message.get("relay_pid")
        node.batches += 1

        def last(key: str) -> Beat | None:
            track = self.tracks.get(key)
            return track.beat if track is not None and track.beat.host == host else None

        if message.get("columns"):
            node.columns = list(message["columns"])
        for beat, bye in beats(message, last, node.columns):
            track = self._take(beat, bye, now, identity)
            if track is not None:
                track.relayed = True
        if "shims" not in message:  # unchanged since the last batch that carried them
            return node
        node.shims = {}
        for shim in message["shims"] or ():
            key = f"rank {shim.get('rank')}" if shim.get("rank") is not None \
                else f"pid {shim.get('pid')}"
            node.shims[key] = shim
            track = self.tracks.get(key)
            if track is not None and track.beat.host == host:
                track.alive = bool(shim.get("alive"))
                ended = shim.get("exit")
                if ended and not track.finished:
                    self._ended(track, ended.get("code"), ended.get("signal"))
        return node

    def note_exit(self, message: dict, now: float) -> Track:
        """A rank's exit, reported by its shim the moment it happened. A rank that never beat
        (no agent) gets a track here, so that its death is known."""
        beat = Beat(pid=int(message.get("pid") or 0), host=str(message.get("host") or "?"),
                    rank=message.get("rank"))
        key = key_of(beat)
        track = self.tracks.get(key)
        if track is None:
            track = self.tracks[key] = Track(key, beat, b"", now, now, relayed=True)
            self._ordered = None
        if not track.finished:
            self._ended(track, message.get("code"), message.get("signal"))
        return track

    def _ended(self, track: Track, code, signum) -> None:
        track.alive, track.exit = False, exit_text(code, signum)
        if code == 0 and not signum:  # a rank without an agent's goodbye that ended well
            track.finished = True
        else:
            track.gone = True

    def silent_nodes(self, now: float, after: float) -> list[Node]:
        """The nodes whose relay has not been heard from for `after` seconds."""
        return [n for n in self.nodes.values() if now - n.last_heard >= after]

    def ingest(self, message: dict, now: float, identity: bytes = b"") -> Track | None:
        """A verified beat or goodbye. Returns the rank's track."""
        try:
            beat = Beat.from_json(message)
        except (TypeError, ValueError):
            return None  # signed but not a beat this version understands
        return self._take(beat, message.get("type") == "bye", now, identity)

    def _take(self, beat: Beat, bye: bool, now: float, identity: bytes) -> Track | None:
        try:
            since = max(float(beat.since_progress), 0.0)
            float(beat.collective_seconds)
        except (TypeError, ValueError):
            return None
        self.beats += 1
        key = key_of(beat)
        advanced_at = now - since
        track = self.tracks.get(key)
        if track is None and beat.rank is not None:
            # A process whose agent started before it knew its rank (Lightning's spawned
            # ranks learn theirs from the process group) is one track, now numbered.
            unnumbered = self.tracks.get(f"pid {beat.pid}")
            if unnumbered is not None and unnumbered.beat.host == beat.host:
                del self.tracks[unnumbered.key]
        if track is None or track.beat.pid != beat.pid:  # new, or the rank was restarted
            track = self.tracks[key] = Track(key, beat, identity, now, advanced_at)
            self._ordered = None
        else:
            if beat.calls != track.beat.calls:
                track.advanced_at = advanced_at
            track.beat, track.identity, track.last_beat = beat, identity, now
            track.gone = False
        if beat.step is not None and (track.step_at is None or beat.step != track.history[-1][1]):
            if track.step_at is not None:
                track.intervals.append(now - track.step_at)
            track.step_at = now
        track.history.append((now, beat.step, beat.collective_seconds))
        while now - track.history[0][0] > WINDOW:
            track.history.popleft()
        if bye:
            track.finished = True
        if beat.world_size:
            self.world_size = beat.world_size
        return track

    def progress_reported(self) -> bool:
        return any(t.beat.calls for t in self.tracks.values())

    def step_intervals(self) -> list[float]:
        """The recent seconds between step changes, every rank's (beats arrive about once a
        second, so steps shorter than that count as their beat interval: a floor, not a
        figure)."""
        return [x for t in self.tracks.values() for x in t.intervals]

    def mark_progressing(self, key: str, now: float) -> None:
        """A look saw this rank's stack progressing: silent, but not stalled (for a while)."""
        track = self.tracks.get(key)
        if track is not None:
            track.progressing_at = now

    def mark_gone(self, key: str) -> None:
        track = self.tracks.get(key)
        if track is not None and not track.finished:
            track.gone = True

    def statuses(self, now: float, *, stall_after: float, dead_after: float,
                 slow_score: float) -> list[RankStatus]:
        measured = {k: t.rate_and_work() for k, t in self.tracks.items()}
        scores = self.straggler_scores(measured)
        unheard = {n.host for n in self.silent_nodes(now, dead_after)}
        if self._ordered is None or len(self._ordered) != len(self.tracks):
            self._ordered = sorted(self.tracks.values(), key=_order)
        out = []
        for track in self._ordered:
            beat = track.beat
            beat_age = now - track.last_beat
            since = now - track.advanced_at
            collective = beat.collective
            if collective is not None and collective.inside:
                collective = dataclasses.replace(
                    collective, seconds=round(collective.seconds + beat_age, 3))
            out.append(RankStatus(
                key=track.key, rank=beat.rank, pid=beat.pid, host=beat.host,
                status=_status(track, now, beat_age, since, scores.get(track.key),
                               stall_after, dead_after, slow_score,
                               unheard=track.relayed and track.beat.host in unheard),
                step=beat.step, phase=beat.phase,
                phase_seconds=round(beat.phase_seconds + beat_age, 3),
                since_progress=round(since, 3), beat_age=round(beat_age, 3),
                step_rate=_round(measured[track.key][0]), collective=collective,
                # The beat's own containers: a beat is replaced, never changed, once taken.
                straggler_score=_round(scores.get(track.key)), fields=beat.fields,
                error=beat.error, workers=beat.workers, extra=beat.extra, exit=track.exit))
        return out

    def straggler_scores(self, measured: dict[str, tuple]) -> dict[str, float]:
        """Each live rank's work per step against the median of the others'. Work is time
        outside collectives, so in synchronous training, where every rank takes the same
        steps per second, the rank the others wait for still stands out (with instrument()).
        `measured` is each track's rate_and_work()."""
        work = {}
        for track in self.tracks.values():
            if not (track.finished or track.gone):
                w = measured[track.key][1]
                if w is None:
                    return {}  # compare only when every live rank has been measured
                work[track.key] = w
        if len(work) < 2:
            return {}
        ordered = sorted(work.values())
        scores = {}
        for key, w in work.items():
            median = _median_without(ordered, bisect.bisect_left(ordered, w))
            scores[key] = w / median if median > 0 else (1.0 if w == 0 else float("inf"))
        return scores


def _median_without(ordered: list[float], i: int) -> float:
    """The median of ordered[:i] + ordered[i+1:], in O(1): scoring 2,240 ranks stays cheap."""

    def at(j: int) -> float:  # the j-th element once index i is removed
        return ordered[j] if j < i else ordered[j + 1]

    n = len(ordered) - 1
    return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2


# A rank that reports this phase is not working by intent (an MPI engine between notebook
# cells): never stalled, however long it has not advanced.
IDLE_PHASE = "idle"


def _status(track: Track, now: float, beat_age: float, since: float, score: float | None,
            stall_after: float, dead_after: float, slow_score: float, *,
            unheard: bool = False) -> RankState:
    if track.finished:
        return RankState.ERRORED if track.beat.error else RankState.FINISHED
    if track.gone:
        return RankState.DEAD
    if beat_age >= dead_after:
        # No beats: a dead process, unless its shim says it lives, or nobody can say.
        if unheard:
            return RankState.UNREACHABLE
        return RankState.SILENT if track.alive else RankState.DEAD
    if track.beat.phase == IDLE_PHASE:
        return RankState.IDLE
    if since >= stall_after and track.beat.calls:
        seen = track.progressing_at
        # A look saw it progressing since it last advanced: busy, until that is stall_after
        # old, when it is judged again (a look, or the stall it then is).
        if seen is not None and seen >= track.advanced_at and now - seen < stall_after:
            return RankState.BUSY
        collective = track.beat.collective
        inside = collective is not None and collective.inside
        return RankState.WAITING if inside else RankState.STALLED
    if score is not None and score >= slow_score:
        return RankState.SLOW
    # A rank that never called progress() (a plain script's injected agent): nothing is known
    # of its advance, only whether it is inside a collective.
    collective = track.beat.collective
    if not track.beat.calls and collective is not None and collective.inside:
        return RankState.WAITING
    return RankState.RUNNING


def _order(track: Track):
    return (track.rank is None, track.rank if track.rank is not None else track.beat.pid)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
