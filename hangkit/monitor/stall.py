"""Stall detection: a pure step(now) -> new events over the collector's state.

No sleeping and no clock inside: the caller passes `now` (the watcher's loop, the notebook
monitor's thread, or a test's fake clock). Each condition is reported once, when it starts; it
can be reported again after it has cleared.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from hangkit.monitor.collector import Collector
from hangkit.records import RankState, RankStatus, StallEvent
from hangkit.text import who

# How much later than a stopped rank another rank must have advanced to count as advancing.
ADVANCE_MARGIN = 1.0
# Kinds that mean the job is not advancing (watch --progress-timeout treats them as a hang).
HANG_KINDS = ("stall", "stopped")


# --progress-timeout auto: AUTO_FACTOR times the AUTO_PERCENTILE of the ranks' recent step
# intervals, never under the floor (NVIDIA's ft_launcher derives its timeouts alike, with a
# safety factor of 5). Until AUTO_MIN_INTERVALS steps were seen, nothing counts as a stall.
AUTO = "auto"  # how --progress-timeout asks for it
AUTO_FACTOR = 5.0
AUTO_PERCENTILE = 0.95
AUTO_FLOOR = 30.0
AUTO_MIN_INTERVALS = 5


@dataclass
class StallConfig:
    stall_after: float = 60.0  # seconds without progress that make a rank stopped
    dead_after: float = 5.0  # seconds without a beat that make a rank dead
    straggler_score: float = 2.0  # work per step, against the other ranks' median
    desync_after: float = 2.0  # ranks in different collectives for this long is a desync
    auto: bool = False  # stall_after from the step intervals seen, stall_after its floor

    def stall_after_now(self, collector: Collector) -> float:
        """The stall_after in force: fixed, or (auto) derived from the recent steps."""
        if not self.auto:
            return self.stall_after
        intervals = sorted(collector.step_intervals())
        if len(intervals) < AUTO_MIN_INTERVALS:
            return float("inf")
        high = intervals[min(int(AUTO_PERCENTILE * len(intervals)), len(intervals) - 1)]
        return max(self.stall_after, AUTO_FACTOR * high)


class StallDetector:
    def __init__(self, collector: Collector, config: StallConfig | None = None):
        self.collector = collector
        self.config = config or StallConfig()
        self.active: dict[tuple, StallEvent] = {}
        self._desync_since: dict[tuple, float] = {}
        self.stall_after = self.config.stall_after  # as last derived (auto)

    def statuses(self, now: float) -> list[RankStatus]:
        c = self.config
        self.stall_after = c.stall_after_now(self.collector)
        return self.collector.statuses(now, stall_after=self.stall_after,
                                       dead_after=c.dead_after, slow_score=c.straggler_score)

    def step(self, now: float) -> list[StallEvent]:
        ranks = self.statuses(now)
        found: dict[tuple, StallEvent] = {}
        for finder in (self._dead, self._unheard, self._stall, self._desync, self._stragglers):
            found.update(finder(ranks, now))
        new = [e for k, e in found.items() if k not in self.active]
        self.active = {k: self.active.get(k, e) for k, e in found.items()}
        return new

    # Each finder returns {condition key: event} for the conditions that hold now.

    def _dead(self, ranks: list[RankStatus], now: float) -> dict:
        out = {}
        for r in ranks:
            if r.status != RankState.DEAD:
                continue
            track = self.collector.tracks[r.key]
            if track.exit:
                why = f"its process {r.pid} on {r.host} {track.exit}"
            elif track.gone:
                why = f"its process {r.pid} on {r.host} exited"
            else:
                why = (f"no beat for {r.beat_age:.0f} s (process {r.pid} on {r.host}: gone, "
                       "stopped, or its main thread holds the GIL)")
            where = f" in phase {r.phase!r}" if r.phase else ""
            step = f" at step {r.step}" if r.step is not None else ""
            seen = f"; last seen{where}{step}" if where or step else ""
            out[("dead", r.key)] = StallEvent(
                "dead", f"{r.key} is dead: {why}{seen}",
                ranks=_rank_numbers([r]), at=now)
        return out

    def _unheard(self, ranks: list[RankStatus], now: float) -> dict:
        """A node whose relay went silent: its ranks are not observed, not known dead."""
        out = {}
        for node in self.collector.silent_nodes(now, self.config.dead_after):
            there = node.ranks()
            summary = (f"{node.host} went silent: no word from its relay (pid "
                       f"{node.relay_pid}) for {now - node.last_heard:.0f} s")
            if there:
                summary += (f"; {who(there, [])} there {'is' if len(there) == 1 else 'are'} "
                            "no longer observed")
            out[("node-silent", node.host)] = StallEvent("node-silent", summary, ranks=there,
                                                         at=now)
        return out

    def _stall(self, ranks: list[RankStatus], now: float) -> dict:
        # Dead ranks are reported by _dead; here they only explain why the others wait.
        # An idle rank (an engine between cells) waits by intent: it is never stopped. A rank
        # on a node gone silent is not known to have stopped: _unheard says so.
        # A rank that never called progress() (a plain script's injected agent) says nothing
        # of its advance: its silence is judged by output and looks, never here.
        live = [r for r in ranks if not r.status.ended
                and r.status not in (RankState.IDLE, RankState.UNREACHABLE)
                and self.collector.tracks[r.key].beat.calls]
        dead = [r for r in ranks if r.status == RankState.DEAD]
        # A busy rank (silent, but a look saw it progressing) has not stopped: while one is,
        # the others wait for it, and that is no stall yet.
        stopped = [r for r in live if r.since_progress >= self.stall_after
                   and r.status != RankState.BUSY]
        if not stopped:
            return {}
        # Others "still advance" only if they advanced well after the stopped ranks last did:
        # in lockstep training every rank stops within milliseconds of the first, and that is
        # one stall of all, not one rank stopping while the others go on.
        last_stop = min(r.since_progress for r in stopped)
        advancing = [r for r in live if r.since_progress < last_stop - ADVANCE_MARGIN]
        if advancing:
            verb = "still advance" if len(advancing) > 1 else "still advances"
            summary = (f"{_who(stopped)} stopped advancing: {_where_all(stopped)}; "
                       f"{_who(advancing)} {verb}")
            return {("stopped", tuple(r.key for r in stopped)): StallEvent(
                "stopped", summary, ranks=_rank_numbers(stopped), at=now)}
        if len(stopped) < len(live):
            return {}  # the rest stopped too, but not yet for stall_after
        waiting = [r for r in stopped if r.status == RankState.WAITING]
        culprits = [r for r in stopped if r.status != RankState.WAITING]
        parts = []
        if dead:
            parts.append(f"{_who(dead)} {'are' if len(dead) > 1 else 'is'} dead")
        if culprits:
            parts.append(_where_all(culprits))
        parts += [f"{_who(g)} {'wait' if len(g) > 1 else 'waits'} in {c}"
                  for c, g in _by_collective(waiting).items()]
        missing = self._never_reported()
        if missing:
            parts.append(f"{who(missing, [])} never reported progress")
        unheard = [r for r in ranks if r.status == RankState.UNREACHABLE]
        if unheard:
            parts.append(f"{_who(unheard)} not observed (their node went silent)")
        summary = f"no rank advanced for {last_stop:.0f} s: " + "; ".join(parts)
        # A dead rank explains the rest.
        blamed = _rank_numbers(dead) or _rank_numbers(culprits) or missing
        return {("stall",): StallEvent("stall", summary, ranks=blamed, at=now)}

    def _desync(self, ranks: list[RankStatus], now: float) -> dict:
        by_comm = defaultdict(list)
        for r in ranks:
            c = r.collective
            if c is not None and c.inside and not r.status.ended:
                by_comm[(c.library, c.comm)].append(r)
        out, seen = {}, set()
        for comm, members in by_comm.items():
            groups = _by_collective(members)
            if len(groups) < 2:
                continue
            signature = (comm, tuple(sorted((r.key, r.collective.op, r.collective.seq)
                                            for r in members)))
            seen.add(signature)
            since = self._desync_since.setdefault(signature, now)
            if now - since < self.config.desync_after:
                continue
            ordered = sorted(groups.items(), key=lambda kv: (len(kv[1]), kv[1][0].rank or 0))
            summary = "; ".join(f"{_who(g)} {'are' if len(g) > 1 else 'is'} in {c}"
                                for c, g in ordered)
            out[("desync", signature)] = StallEvent(
                "desync", summary, ranks=_rank_numbers(ordered[0][1]), at=now,
                case="MP-02" if comm[0] == "mpi" else "TD-02")
        self._desync_since = {k: v for k, v in self._desync_since.items() if k in seen}
        return out

    def _stragglers(self, ranks: list[RankStatus], now: float) -> dict:
        scores = {r.key: r.straggler_score for r in ranks if r.straggler_score is not None}
        out = {}
        for r in ranks:
            if r.status != RankState.SLOW:
                continue
            others = sorted(s for k, s in scores.items() if k != r.key)
            summary = (f"{r.key} is a straggler: {r.straggler_score:.1f}x the other ranks' "
                       "median work per step (time outside collectives)")
            if r.step_rate is not None:
                summary += f"; {r.step_rate:.2f} steps/s"
            if others:
                summary += f"; other ranks score {others[0]:.1f}-{others[-1]:.1f}"
            out[("straggler", r.key)] = StallEvent(
                "straggler", summary, ranks=_rank_numbers([r]), at=now,
                scores={k: round(v, 2) for k, v in scores.items()})
        return out

    def _never_reported(self) -> list[int]:
        size = self.collector.world_size
        if not size:
            return []
        seen = {t.rank for t in self.collector.tracks.values()}
        return [r for r in range(size) if r not in seen]


def _rank_numbers(statuses: list[RankStatus]) -> list[int]:
    return sorted(r.rank for r in statuses if r.rank is not None)


def _who(statuses: list[RankStatus]) -> str:
    ranks = _rank_numbers(statuses)
    if len(ranks) == len(statuses):
        return who(ranks, [])
    return ", ".join(r.key for r in statuses)


def _where(r: RankStatus) -> str:
    parts = []
    if r.status == RankState.SILENT:
        parts.append(f"silent for {r.beat_age:.0f} s though its process lives (its main thread "
                     "may hold the GIL)")
    if r.phase:
        parts.append(f"in phase {r.phase!r} for {r.phase_seconds:.0f} s")
    if r.step is not None:
        parts.append(f"at step {r.step}")
    if r.collective is not None and not r.collective.inside:
        parts.append(f"not in a collective (last: {r.collective.describe()})")
    return ", ".join(parts) or "no phase reported"


def _where_all(statuses: list[RankStatus]) -> str:
    return "; ".join(f"{r.key} {_where(r)}" for r in statuses)


def _by_collective(statuses: list[RankStatus]) -> dict[str, list[RankStatus]]:
    groups: dict[str, list[RankStatus]] = defaultdict(list)
    for r in statuses:
        groups[r.collective.describe()].append(r)
    return groups
