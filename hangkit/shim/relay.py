"""The node relay: one process per node, started by the node's first `hangkit rank` shim.

It binds a ROUTER on a local socket (hangkit.shim.relay_paths) that the node's agents send
their beats to, and its shims their hello and exit; it holds one DEALER connected to the
monitor. Every INTERVAL it sends the monitor one batch: the beats that arrived since the last
(each aged by how long it waited here, so the monitor's idea of when a rank last advanced stays
exact), and every shim's rank, pids and whether its rank is alive. A rank's exit goes up at
once. The monitor's requests become jobs (gather.py) that this one loop drives.

It ends once the shim that started it and every shim it heard from are gone (they end when
their ranks do), or on SIGTERM: it never outlives its job.
The lock file it inherits is held as long as it runs, so a node never has two.
"""

from __future__ import annotations

import contextlib
import itertools
import linecache
import logging
import os
import shutil
import signal
import socket
import sys
import time

from hangkit import deadline
from hangkit.batches import Encoder, key_of
from hangkit.procfs import pid_alive
from hangkit.shim import MADE_MARK
from hangkit.shim.gather import JOBS, Gather, Job
from hangkit.transport import (
    MAX_MESSAGE_BYTES,
    MONITOR_ADDRESS,
    MONITOR_KEY,
    Signer,
    Verifier,
    secure_client,
)

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between batches: the node's heartbeat to the monitor
SEND_HWM = 16  # batches and replies queued for a slow monitor before they are dropped
SOURCE_SECONDS = 0.5  # for one source file's lines (frames' text, for the monitor)
AGENT_KINDS = ("beat", "bye")
REPLY_KINDS = ("stacks", "recording", "captured", "sampled", "signalled", "ended")
RECEIVE_BURST = 1000  # local messages taken in one go, at most


class Relay:
    def __init__(self, endpoint: str, monitor: str, key: str, *, host: str | None = None,
                 parent: int | None = None,
                 clock=time.monotonic):
        import zmq

        self.zmq, self.clock = zmq, clock
        self.host = host or socket.gethostname()
        self.endpoint, self.parent = endpoint, parent
        self.signer, self.verifier = Signer(key), Verifier(key)
        self.up_verifier = Verifier(key)
        self.ctx = zmq.Context()
        self.local = self.ctx.socket(zmq.ROUTER)
        for option, value in ((zmq.LINGER, 0), (zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)):
            self.local.setsockopt(option, value)
        _bind_private(self.local, endpoint)
        self.up = self.ctx.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 500), (zmq.IMMEDIATE, 1), (zmq.SNDHWM, SEND_HWM),
                              (zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)):
            self.up.setsockopt(option, value)
        secure_client(self.up, monitor, key)  # CurveZMQ where the monitor listens beyond loopback
        self.up.connect(monitor)
        self._agents: dict[str, tuple[bytes, dict, float]] = {}  # key: (identity, beat, at)
        self._fresh: set[str] = set()  # agents whose latest beat has not gone up yet
        self._encoder = Encoder()
        self._shims: dict[str, dict] = {}  # rank key: the shim's hello, with identity, exit
        self._routes: dict[int, tuple[Gather, str]] = {}
        self._ids = itertools.count(1)
        self._jobs: list[Job] = []
        self.dropped = 0  # batches and replies the monitor could not take

    # -- what jobs use -----------------------------------------------------------------------

    def agents(self) -> dict[str, bytes]:
        """{rank key: identity} of the agents that beat here and have not said goodbye."""
        return {k: ident for k, (ident, beat, _) in self._agents.items()
                if beat.get("type") != "bye"}

    def shims(self) -> dict[str, bytes]:
        """{rank key: identity} of the shims whose rank is still running."""
        return {k: s["identity"] for k, s in self._shims.items() if s.get("exit") is None}

    def last_beat(self, key: str) -> dict | None:
        found = self._agents.get(key)
        return found[1] if found else None

    def ask(self, who: str, identity: bytes, message: dict, gather: Gather) -> None:
        rid = next(self._ids)
        self._routes[rid] = (gather, who)
        self._send_local(identity, {**message, "request": rid})

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        zmq = self.zmq
        poller = zmq.Poller()
        poller.register(self.local, zmq.POLLIN)
        poller.register(self.up, zmq.POLLIN)
        next_batch = self.clock()
        try:
            while True:
                now = self.clock()
                if now >= next_batch:
                    self._batch(now)
                    next_batch = now + INTERVAL
                    if self._finished():
                        return 0
                wake = min([next_batch] + [j.deadline for j in self._jobs])
                ready = dict(poller.poll(max(wake - self.clock(), 0.0) * 1000))
                if self.local in ready:
                    self._receive_local()
                if self.up in ready:
                    self._receive_up()
                self._step_jobs()
        finally:
            self.ctx.destroy(linger=0)

    def _receive_local(self) -> None:
        zmq = self.zmq
        for _ in range(RECEIVE_BURST):  # then the loop's other work: a flood never stops it
            try:
                frames = self.local.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = self.verifier.open(frames[1:])
            if message is not None:
                try:
                    self._local_message(frames[0], message)
                except (KeyError, TypeError, ValueError):
                    log.debug("not understood: %r", message, exc_info=True)

    def _local_message(self, identity: bytes, m: dict) -> None:
        kind = m.get("type")
        if kind in AGENT_KINDS:
            key = key_of(m)
            self._agents[key] = (identity, m, self.clock())
            self._fresh.add(key)
        elif kind == "hello":
            key = key_of(m)
            self._shims[key] = {**m, "identity": identity, "exit": None}
            self._send_local(identity, {"type": "welcome"})
        elif kind == "exit":
            key = key_of(m)
            if key in self._shims:
                self._shims[key]["exit"] = {"code": m.get("code"), "signal": m.get("signal")}
            if self._fresh:  # the rank's last beats (its goodbye) before its exit
                self._batch(self.clock())
            self._send_up({"type": "exit", "host": self.host,
                           **{k: m.get(k) for k in ("rank", "pid", "code", "signal")}})
        elif kind in REPLY_KINDS:
            route = self._routes.pop(m.get("request"), None)
            if route is not None:
                gather, who = route
                gather.replies[who] = m

    def _receive_up(self) -> None:
        zmq = self.zmq
        while True:
            try:
                frames = self.up.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            request = self.up_verifier.open(frames)
            job = JOBS.get((request or {}).get("type"))
            if job is not None:
                try:
                    self._jobs.append(job(self, request, self.clock()))
                except (KeyError, TypeError, ValueError):
                    log.debug("request not understood: %r", request, exc_info=True)

    def _step_jobs(self) -> None:
        now, running = self.clock(), []
        for job in self._jobs:
            reply = job.step(now)
            if reply is None:
                running.append(job)
            else:
                self._send_up(with_source(reply))
        self._jobs = running
        if not running:  # replies that came too late have nobody waiting for them
            self._routes.clear()

    def _batch(self, now: float) -> None:
        beats = [(self._agents[key][1], now - self._agents[key][2])
                 for key in sorted(self._fresh)]
        self._fresh.clear()
        shims = []
        for s in self._shims.values():
            alive = s["exit"] is None and _alive(s.get("pid"))
            shims.append({k: s.get(k) for k in ("rank", "local_rank", "shim_pid", "pid")}
                         | {"alive": alive, "exit": s["exit"]})
        batch = self._encoder.batch(beats, shims, host=self.host, relay_pid=os.getpid(),
                                    interval=INTERVAL)
        if not self._send_up(batch):
            self._encoder.lost()

    def _finished(self) -> bool:
        """The shim that started us and every shim that said hello are gone (a short job's
        shims may end before they could)."""
        if self._jobs or _alive(self.parent):
            return False
        return not any(_alive(s.get("shim_pid")) for s in self._shims.values())

    def _send_local(self, identity: bytes, message: dict) -> None:
        with contextlib.suppress(self.zmq.ZMQError):  # that process is gone
            self.local.send_multipart([identity, *self.signer.frames(message)],
                                      self.zmq.NOBLOCK)

    def _send_up(self, message: dict) -> bool:
        try:
            self.up.send_multipart(self.signer.frames(message), self.zmq.NOBLOCK)
            return True
        except self.zmq.ZMQError:  # no monitor, or a slow one: this node's news is dropped
            self.dropped += 1
            return False


def _bind_private(sock, endpoint: str) -> None:
    """Binds the node's socket 0600 whatever the umask: created so (a private umask around the
    bind, in this one-threaded process), and made so (chmod) before anyone is read. Only this
    user (and root) can connect; everyone else never reaches ZeroMQ (issue 24)."""
    previous = os.umask(0o077)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(previous)
    path = endpoint.removeprefix("ipc://")
    if endpoint.startswith("ipc://") and not path.startswith("@"):  # @: abstract, no file
        os.chmod(path, 0o600)


def with_source(reply: dict) -> dict:
    """Every Python frame of a reply given its line's text, read here: the monitor, on
    another node, cannot read this node's files (a notebook engine's cell lives in /tmp)."""
    threads = [t for ts in (reply.get("answers") or {}).values() for t in ts] \
        if reply.get("type") == "stacks" else []
    threads += [s["thread"] for s in reply.get("samples") or () if isinstance(s, dict)]
    threads += [t for p in reply.get("snapshots") or () for t in p.get("threads") or ()]
    files: dict[str, list[str]] = {}
    for thread in threads:
        for f in thread.get("frames") or ():
            if not f.get("native") and f.get("line") and f.get("code") is None:
                name = str(f.get("file"))
                if name not in files:
                    files[name] = _lines(name)
                lines, line = files[name], int(f["line"])
                f["code"] = lines[line - 1].strip() if 0 < line <= len(lines) else None
    return reply


def _lines(path: str) -> list[str]:
    """A source file's lines, under a deadline: the user's code may sit on the hung
    filesystem that the hang is about, and the relay must keep answering."""
    try:
        return deadline.call(lambda: linecache.getlines(path), timeout=SOURCE_SECONDS,
                             name=f"reading {path}")
    except deadline.DeadlineExceeded:
        return []


def _alive(pid) -> bool:
    return isinstance(pid, int) and pid > 0 and pid_alive(pid)


def main(argv: list[str] | None = None) -> int:
    """`python -m hangkit.shim.relay ENDPOINT LOCK_FD LOCK_PATH PARENT_PID`, started by
    rank.py. SIGTERM (the job ending) ends it cleanly: its socket and lock file go too."""
    endpoint, lock_fd, lock_path, parent = (argv if argv is not None else sys.argv[1:])[:4]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        monitor, key = os.environ.get(MONITOR_ADDRESS), os.environ.get(MONITOR_KEY)
        if not monitor or not key:
            return 2
        os.set_inheritable(int(lock_fd), False)  # held by us alone: the node's one relay
        try:
            relay = Relay(endpoint, monitor, key, parent=int(parent))
        except Exception as e:  # a socket that cannot be bound: the node goes unobserved
            print(f"hangkit: the node relay did not start ({type(e).__name__}: {e}); this "
                  "node's ranks are not observed", file=sys.stderr)
            return 1
        return relay.run()
    finally:
        # Whichever way it ends (done, SIGTERM, even during start-up), while the lock is still
        # ours: its socket and lock, and a TMPDIR that a shim made for the node's ranks.
        remove_relay_files(endpoint, lock_path)
        tmpdir = os.environ.get("TMPDIR")
        if tmpdir and os.path.exists(os.path.join(tmpdir, MADE_MARK)):
            shutil.rmtree(tmpdir, ignore_errors=True)


def remove_relay_files(endpoint: str, lock_path: str) -> None:
    """A relay's socket and lock file: by the relay as it ends, or by the shim that started it
    when it was killed by a signal."""
    for path in (endpoint.removeprefix("ipc://"), lock_path):
        with contextlib.suppress(OSError):
            os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
