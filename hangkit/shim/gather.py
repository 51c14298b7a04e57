"""The relay's answers to the monitor: each request becomes a job that asks the node's agents
and shims at once, collects their replies until each has answered or its deadline passed, and
then gives the one reply the monitor waits for. Jobs never wait themselves: the relay's loop
feeds them replies and the time (step(now)), so one loop serves every request at once.

What a job asks, in order:
- stacks?, recording?: the agents of the ranks named;
- sample?: the agents for their stacks, then the shims for py-spy's of what no agent gave
  (DataLoader workers, a rank whose main thread holds the GIL);
- capture?: the agents for their stacks, then at once the shims for a capture of their rank's
  whole tree (given the agent's stacks, or the rank's faulthandler file) and the answering
  agents for their Flight Recorder dumps;
- signal?, end?: the shims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REPLY_MARGIN = 0.3  # seconds a job keeps of the monitor's timeout, for its reply to travel
AGENT_SHARE = 0.25  # of a sample's or capture's time, what the agents have for their stacks
AGENT_STACKS_MAX = 1.0  # seconds, at most, for the agents' stacks in a capture


@dataclass
class Gather:
    """One request sent to several on the node (agents or shims), and their replies."""

    targets: set = field(default_factory=set)  # who was asked: rank keys
    deadline: float = 0.0
    replies: dict = field(default_factory=dict)  # who: the reply message

    def done(self, now: float) -> bool:
        return self.targets <= self.replies.keys() or now >= self.deadline


class Job:
    """One request of the monitor's. `relay` offers agents(), shims(), ask(who, to, message,
    gather) and host; step(now) returns the reply once there is one."""

    def __init__(self, relay, request: dict, now: float):
        self.relay, self.request = relay, request
        timeout = float(request.get("timeout") or 1.0)
        self.deadline = now + max(timeout - REPLY_MARGIN, 0.1)
        self.started = now

    def gather(self, kind: str, to: dict, payload, deadline: float) -> Gather:
        """Asks each of `to` ({who: identity}) `kind`, with payload(who) added."""
        g = Gather(set(to), min(deadline, self.deadline))
        for who, identity in to.items():
            self.relay.ask(who, identity, {"type": kind, **payload(who)}, g)
        return g

    def reply(self, kind: str, **body) -> dict:
        return {"type": kind, "request": self.request.get("request"), "host": self.relay.host,
                **body}

    def step(self, now: float) -> dict | None:
        raise NotImplementedError


class Forward(Job):
    """stacks? or recording? for the ranks named: asked of their agents."""

    def __init__(self, relay, request: dict, now: float):
        super().__init__(relay, request, now)
        self.kind = request["type"].rstrip("?")
        wanted = set(request.get("ranks") or ())
        agents = {k: a for k, a in relay.agents().items() if k in wanted}
        self.unknown = sorted(wanted - agents.keys())
        self.asked = self.gather(f"{self.kind}?", agents, lambda _: {}, self.deadline)

    def step(self, now: float) -> dict | None:
        if not self.asked.done(now):
            return None
        answers = {}
        for who, m in self.asked.replies.items():
            answers[who] = m.get("threads", []) if self.kind == "stacks" else \
                [m.get("recording"), m.get("error")]
        missing = sorted(self.asked.targets - answers.keys()) + self.unknown
        return self.reply(self.kind, answers=answers, missing=missing)


class Sample(Job):
    """One stack sample of every Python process of the node's ranks: the agents' main threads
    where they answer, py-spy's (by each rank's shim) for the rest."""

    def __init__(self, relay, request: dict, now: float):
        super().__init__(relay, request, now)
        share = (self.deadline - now) * AGENT_SHARE
        # Agents that did not answer an earlier sample of this look (a GIL held) are not
        # waited for again: their shims sample them with py-spy.
        quiet = set(request.get("quiet") or ())
        agents = {k: ident for k, ident in relay.agents().items() if k not in quiet}
        self.stacks = self.gather("stacks?", agents, lambda _: {}, now + share)
        self.sampled: Gather | None = None

    def step(self, now: float) -> dict | None:
        if self.sampled is None:
            if not self.stacks.done(now):
                return None
            given = _agent_pids(self.stacks)
            self.sampled = self.gather("sample?", self.relay.shims(),
                                       lambda _: {"skip": sorted(given)}, self.deadline)
            return None
        if not self.sampled.done(now):
            return None
        samples = []
        for m in self.stacks.replies.values():
            main = _main_thread(m.get("threads", []))
            if main is not None:
                samples.append({"pid": m.get("pid"), "rank": m.get("rank"), "thread": main})
        for m in self.sampled.replies.values():
            samples += m.get("samples", [])
        return self.reply("sample", samples=samples,
                          quiet=sorted(self.stacks.targets - self.stacks.replies.keys()),
                          missing=sorted(self.sampled.targets - self.sampled.replies.keys()))


class Capture(Job):
    """Every process of the node's ranks captured by their shims (stacks, CPU, syscall, role),
    with the agents' stacks where they answered and their Flight Recorder dumps."""

    def __init__(self, relay, request: dict, now: float):
        super().__init__(relay, request, now)
        share = min((self.deadline - now) * AGENT_SHARE, AGENT_STACKS_MAX)
        self.stacks = self.gather("stacks?", relay.agents(), lambda _: {}, now + share)
        self.captured: Gather | None = None
        self.recorded: Gather | None = None

    def step(self, now: float) -> dict | None:
        relay = self.relay
        if self.captured is None:
            if not self.stacks.done(now):
                return None
            agents = relay.agents()
            answered = {k: agents[k] for k in self.stacks.replies if k in agents}
            self.recorded = self.gather("recording?", answered, lambda _: {}, self.deadline)
            self.captured = self.gather("capture?", relay.shims(), self._shim_request,
                                        self.deadline)
            return None
        if not (self.captured.done(now) and self.recorded.done(now)):
            return None
        snapshots = []
        for m in self.captured.replies.values():
            snapshots += m.get("snapshots", [])
        recordings = {who: [m.get("recording"), m.get("error")]
                      for who, m in self.recorded.replies.items()}
        return self.reply("capture", snapshots=snapshots, recordings=recordings,
                          asked_recordings=sorted(self.recorded.targets),
                          missing=sorted(self.captured.targets - self.captured.replies.keys()),
                          seconds=round(now - self.started, 3))

    def _shim_request(self, who: str) -> dict:
        """What a rank's shim needs to capture it: its agent's stacks, or where its agent's
        faulthandler writes (when the main thread holds the GIL, the agent cannot answer)."""
        m = self.stacks.replies.get(who)
        if m is not None:
            return {"known": {str(m.get("pid")): m.get("threads", [])}}
        beat = self.relay.last_beat(who) or {}
        if beat.get("dump_file") and beat.get("dump_signal"):
            return {"faulthandler": {"pid": beat.get("pid"), "file": beat["dump_file"],
                                     "signal": beat["dump_signal"],
                                     "main_ident": beat.get("main_ident")}}
        return {}


class ToShims(Job):
    """signal? or end? for the ranks named (all, when none are): asked of their shims."""

    def __init__(self, relay, request: dict, now: float):
        super().__init__(relay, request, now)
        self.kind = request["type"].rstrip("?")
        wanted = request.get("ranks")
        shims = {k: s for k, s in relay.shims().items() if wanted is None or k in wanted}
        body = {k: v for k, v in request.items() if k in ("signal", "tree", "grace")}
        self.asked = self.gather(f"{self.kind}?", shims, lambda _: body, self.deadline)

    def step(self, now: float) -> dict | None:
        if not self.asked.done(now):
            return None
        answers = {who: m.get("result") for who, m in self.asked.replies.items()}
        return self.reply(self.kind, answers=answers,
                          missing=sorted(self.asked.targets - answers.keys()))


JOBS = {"stacks?": Forward, "recording?": Forward, "sample?": Sample, "capture?": Capture,
        "signal?": ToShims, "end?": ToShims}


def _main_thread(threads: list[dict]) -> dict | None:
    return next((t for t in threads if t.get("is_main")), threads[0] if threads else None)


def _agent_pids(stacks: Gather) -> set[int]:
    return {m["pid"] for m in stacks.replies.values() if isinstance(m.get("pid"), int)}
