"""The monitor's end of the wire: a ROUTER socket and one thread that turns beats into state.

Where the person is (`hangkit watch`, a notebook kernel) a Monitor binds 127.0.0.1 by default,
or an interface the compute nodes reach for multi-node jobs. Its thread verifies every message
(see hangkit.transport), feeds the collector, notices local ranks whose process is gone, and
carries stack requests to the agents. Callers read state under `lock` and ask for stacks with
request_stacks(); neither ever waits without a deadline.

Bounded before verified (issue 24): its socket takes no frame over MAX_MESSAGE_BYTES, and a
gate (_Gate) decides who may talk to it during each peer's handshake, before any message of
theirs is read: on a loopback address, this user's (or root's) processes on this host; anywhere
else, CurveZMQ clients holding the run's key. docs/security.md has the whole picture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import resource
import socket
import struct
import threading
import time

import zmq
from zmq.utils import z85

from hangkit.errors import UsageError
from hangkit.monitor.collector import Collector, Node
from hangkit.monitor.stall import StallConfig, StallDetector
from hangkit.procfs import pid_alive
from hangkit.records import Activity, Look, RankStatus, Role, StallEvent, ThreadStack
from hangkit.transport import (
    HANDSHAKE_SECONDS,
    MAX_MESSAGE_BYTES,
    MONITOR_ADDRESS,
    MONITOR_KEY,
    ZAP_DOMAIN,
    Signer,
    Verifier,
    curve_for,
    curve_keys,
    new_key,
    peer_uid,
)

log = logging.getLogger(__name__)

POLL_MS = 250
BATCH_SECONDS = 0.02  # at most this much added to a beat's way into the state
RECEIVE_BURST = 1000  # messages taken in one hold of the lock, at most
DETECTION_BUDGET = 0.01  # share of a core that paced stall detection may use
# So a stall is reported at most this late. A pass over 2,240 ranks takes ~25 ms: then
# detection runs every ~2.5 s, within its budget; a few ranks' pass runs every tick.
MAX_DETECTION_INTERVAL = 5.0
LIVENESS_SECONDS = 1.0  # how often local ranks' processes are checked for having exited
# What relays answer to requests for their whole node (ask_nodes).
NODE_REPLIES = ("sample", "capture", "signal", "end")
# The descriptor limit the monitor raises its own to (or the hard limit, if lower): a peer's
# connection holds one until it is refused or its handshake times out, and the common 1,024
# left a flood of them starving the monitor's own work (issue 24). Capped: the job, started
# after, inherits it, and some programs still close every descriptor up to the limit.
MAX_DESCRIPTORS = 65536


class Monitor:
    def __init__(self, *, bind: str = "127.0.0.1", port: int = 0, key: str | None = None,
                 advertise: str | None = None, config: StallConfig | None = None,
                 clock=time.monotonic):
        self.key = key or new_key()
        self.clock = clock
        self.collector = Collector()
        self.detector = StallDetector(self.collector, config)
        self._next_detection = float("-inf")
        self.lock = threading.Lock()
        self.verifier = Verifier(self.key)
        self._signer = Signer(self.key)
        _raise_descriptor_limit()
        host = advertise or (socket.gethostname() if bind in ("0.0.0.0", "*") else bind)
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished rank is not an error
        try:  # the gate first: its options must be set before the socket listens
            self._gate = _Gate(self._ctx, self._router, self.key,
                               curve=curve_for(f"tcp://{host}:0"))
            if port:
                self._router.bind(f"tcp://{bind}:{port}")
                bound = port
            else:
                bound = self._router.bind_to_random_port(f"tcp://{bind}")
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise UsageError(f"cannot listen on {bind}:{port or 'a free port'}: {e}") from None
        self._gate.listening(bound)
        self.address = f"tcp://{host}:{bound}"
        self.host = socket.gethostname()
        # Requests go from callers' threads to the monitor's thread through an inproc pair.
        self._wake_addr = f"inproc://hangkit-monitor-{id(self)}"
        self._wake_in = self._ctx.socket(zmq.PAIR)
        self._wake_in.bind(self._wake_addr)
        self._wake_out = self._ctx.socket(zmq.PAIR)
        self._wake_out.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        self._pending: list[tuple[int, list[bytes], list[bytes]]] = []
        self._replies: dict[int, dict] = {}  # request id: {rank key (or host): its answer}
        self._settled: dict[int, set] = {}  # request id: keys answered or given up
        self._replied = threading.Condition(self.lock)
        self._request_ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hangkit-monitor", daemon=True)
        self._thread.start()

    def environment(self) -> dict[str, str]:
        """What a rank's environment needs for its agent to report here."""
        return {MONITOR_ADDRESS: self.address, MONITOR_KEY: self.key}

    def step(self, now: float | None = None) -> list[StallEvent]:
        """New stall events; the caller's loop decides how often to ask."""
        with self.lock:
            return self.detector.step(self.clock() if now is None else now)

    def detect(self) -> list[StallEvent]:
        """step(), paced: a loop may call this every tick; detection runs only when due, so
        that at thousands of ranks it stays within DETECTION_BUDGET of a core, never less
        often than every MAX_DETECTION_INTERVAL seconds."""
        started = self.clock()
        if started < self._next_detection:
            return []
        events = self.step(started)
        spent = self.clock() - started
        self._next_detection = started + min(spent / DETECTION_BUDGET, MAX_DETECTION_INTERVAL)
        return events

    def statuses(self, now: float | None = None) -> list[RankStatus]:
        with self.lock:
            return self.detector.statuses(self.clock() if now is None else now)

    def progress_reported(self) -> bool:
        """Whether any rank called hangkit.progress(): an agent injected into a plain script
        beats from its start, which says the rank is alive, not that it advanced."""
        with self.lock:
            return self.collector.progress_reported()

    def active_events(self) -> list[StallEvent]:
        with self.lock:
            return list(self.detector.active.values())

    def note_look(self, look: Look) -> None:
        """What a look (monitor/confirm.py) saw: ranks it found progressing read as busy, not
        stalled, in statuses() and stall detection, the same classes for watch and notebook."""
        now = self.clock()
        with self.lock:
            for p in look.processes:
                if p.activity == Activity.PROGRESSING and p.role == Role.RANK:
                    self.collector.mark_progressing(p.key, now)

    def stats(self) -> dict:
        """What a report says about the monitor: where it listened, what it took and refused."""
        with self.lock:
            return {"address": self.address, "ranks": len(self.collector.tracks),
                    "beats": self.collector.beats,
                    "dropped": dataclasses.asdict(self.verifier.dropped),
                    "refused_peers": self._gate.refused}

    def request_stacks(self, keys: list[str], *, timeout: float = 1.0
                       ) -> dict[str, list[ThreadStack]]:
        """Asks the agents of these ranks for their stacks; returns those that answered in time."""
        return self._ask("stacks", keys, timeout)

    def request_recordings(self, keys: list[str], *, timeout: float = 2.0
                           ) -> dict[str, tuple[dict | None, str | None]]:
        """Asks the agents of these ranks for their Flight Recorder dumps; returns, for those
        that answered in time, (the dump in torch's format, None) or (None, why none)."""
        return self._ask("recording", keys, timeout)

    def nodes(self) -> list[Node]:
        """The nodes whose relays report here (ranks run under `hangkit rank`), as of now."""
        with self.lock:
            return [dataclasses.replace(n, shims=dict(n.shims))
                    for n in self.collector.nodes.values()]

    def ask_nodes(self, kind: str, hosts: list[str], *, timeout: float,
                  per_host: dict[str, dict] | None = None, **payload) -> dict[str, dict]:
        """Asks the relays of these nodes `kind` ("sample", "capture", "signal", "end"), all
        at once, with `payload` (and per_host[host] for each); returns the replies of those
        that answered in time: {host: reply}."""
        with self.lock:
            targets = {h: self.collector.nodes[h].identity for h in hosts
                       if h in self.collector.nodes}
        if not targets:
            return {}
        message = {"type": f"{kind}?", "timeout": timeout, **payload}
        return self._request({ident: {**message, **(per_host or {}).get(h, {})}
                              for h, ident in targets.items()}, set(targets), timeout)

    def _ask(self, kind: str, keys: list[str], timeout: float) -> dict:
        """Asks these ranks' agents, directly or through their nodes' relays (one request a
        relay, naming its ranks); {rank key: answer} of those that answered in time."""
        with self.lock:
            tracks = [self.collector.tracks[k] for k in keys if k in self.collector.tracks]
        by_identity: dict[bytes, list[str]] = {}
        for t in tracks:
            by_identity.setdefault(t.identity, []).append(t.key)
        messages = {ident: {"type": f"{kind}?", "timeout": timeout, "ranks": named}
                    for ident, named in by_identity.items()}
        return self._request(messages, {t.key for t in tracks}, timeout)

    def _request(self, messages: dict[bytes, dict], wanted: set[str], timeout: float) -> dict:
        """Sends each identity its message under one request id; waits until every one of
        `wanted` is settled (answered, or given up by its relay) or the timeout."""
        if not messages:
            return {}
        rid = next(self._request_ids)
        with self._replied:
            self._replies[rid], self._settled[rid] = {}, set()
        with self._wake_lock:
            for ident, message in messages.items():
                self._pending.append((rid, [ident], self._signer.frames(
                    {**message, "request": rid})))
            self._wake_out.send(b"")
        deadline = time.monotonic() + timeout
        with self._replied:
            while not wanted <= self._settled[rid]:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._replied.wait(left)
            self._settled.pop(rid)
            return self._replies.pop(rid)

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._wake_lock, contextlib.suppress(zmq.ZMQError):
            self._wake_out.send(b"", zmq.NOBLOCK)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._ctx.destroy(linger=0)
        self._remove_dead_ranks_dump_files()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # The thread

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        for sock in self._gate.sockets:
            poller.register(sock, zmq.POLLIN)
        next_liveness = 0.0
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(POLL_MS))
                if any(sock in ready for sock in self._gate.sockets):
                    self._gate.step()
                if self._wake_in in ready:
                    self._send_requests()
                if self._router in ready:
                    self._receive()
                    # Beats of many ranks arrive spread out over each second, and waking for
                    # each one costs more than handling it: let a few accumulate.
                    self._stop.wait(BATCH_SECONDS)
                now = self.clock()
                if now >= next_liveness:
                    self._check_liveness()
                    next_liveness = now + LIVENESS_SECONDS
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                log.debug("monitor iteration failed", exc_info=True)

    def _receive(self) -> None:
        """Every message waiting, verified, then taken into the state under one hold of the
        lock (at thousands of ranks, one hold a message is what costs)."""
        received = []
        while len(received) < RECEIVE_BURST:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            message = self.verifier.open(frames[1:])
            if message is not None:
                received.append((frames[0], message))
        if not received:
            return
        with self.lock:
            now = self.clock()
            for identity, message in received:
                self._take(identity, message, now)

    def _take(self, identity: bytes, message: dict, now: float) -> None:
        kind = message.get("type")
        try:
            if kind in ("beat", "bye"):
                self.collector.ingest(message, now, identity)
            elif kind == "batch":
                self.collector.ingest_batch(message, now, identity)
            elif kind == "exit":
                self.collector.note_exit(message, now)
            elif kind in ("stacks", "recording"):
                self._store_reply(kind, message)
            elif kind in NODE_REPLIES:
                self._store_node_reply(message)
        except Exception:  # one odd message must not stop the monitor for every rank
            self.verifier.dropped.malformed += 1
            log.debug("message not understood: %r", message, exc_info=True)

    def _store_reply(self, kind: str, message: dict) -> None:
        """An agent's answer, or a relay's answers for its node's agents."""
        rid = message.get("request")
        replies, settled = self._replies.get(rid), self._settled.get(rid)
        if replies is None:
            return  # late: its caller stopped waiting
        if "answers" in message:  # from a relay: several ranks, and those that did not answer
            answers = message.get("answers") or {}
        else:
            key = f"rank {message['rank']}" if message.get("rank") is not None \
                else f"pid {message.get('pid')}"
            answers = {key: message.get("threads", []) if kind == "stacks"
                       else [message.get("recording"), message.get("error")]}
        try:
            for key, value in answers.items():
                if kind == "stacks":
                    replies[key] = [ThreadStack.from_json(t) for t in value]
                else:  # (the dump or None, why there is none)
                    dump, error = value
                    replies[key] = (dump if isinstance(dump, dict) else None, error)
                settled.add(key)
        except (KeyError, TypeError, ValueError):
            return
        settled.update(message.get("missing") or ())
        self._replied.notify_all()

    def _store_node_reply(self, message: dict) -> None:
        rid, host = message.get("request"), message.get("host")
        if rid in self._replies and isinstance(host, str):
            self._replies[rid][host] = message
            self._settled[rid].add(host)
            self._replied.notify_all()

    def _send_requests(self) -> None:
        with self._wake_lock:
            pending, self._pending = self._pending, []
            while True:
                try:
                    self._wake_in.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
        for _, identities, frames in pending:
            for identity in identities:
                with contextlib.suppress(zmq.ZMQError):
                    self._router.send_multipart([identity, *frames], zmq.NOBLOCK)

    def _check_liveness(self) -> None:
        with self.lock:
            local = [(t.key, t.beat.pid, t.beat.dump_file) for t in self.collector.tracks.values()
                     if t.beat.host == self.host and not (t.finished or t.gone)]
        for key, pid, dump_file in local:
            if not pid_alive(pid):
                with self.lock:
                    self.collector.mark_gone(key)
                _remove_dump_file(dump_file)

    def _remove_dead_ranks_dump_files(self) -> None:
        with self.lock:
            local = [(t.beat.pid, t.beat.dump_file) for t in self.collector.tracks.values()
                     if t.beat.host == self.host]
        for pid, dump_file in local:
            if not pid_alive(pid):
                _remove_dump_file(dump_file)


def _remove_dump_file(path: str | None) -> None:
    """A rank's faulthandler dump file (agent.threadstacks.FaultDump): its agent removes it
    at a normal exit; for a rank that was killed, the monitor does."""
    if path and os.path.basename(path).startswith("hangkit-stacks-"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _raise_descriptor_limit() -> None:
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = MAX_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, MAX_DESCRIPTORS)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class _Gate:
    """Who may talk to the monitor, decided during each peer's handshake, before any message
    of theirs is read (ZeroMQ's ZAP: the handshake waits for our answer, in the monitor's
    thread). With CURVE (an address beyond loopback), a client whose key is not the one derived
    from the run's key is refused. On loopback, ZeroMQ cannot tell users apart, the kernel can:
    each connection accepted is looked up (peer_uid), and one whose other end belongs to
    another user, or is not on this host, is shut down (ZeroMQ then drops it) before its
    handshake is answered. Either way, a peer refused never costs more than its handshake."""

    def __init__(self, ctx: zmq.Context, router: zmq.Socket, key: str, *, curve: bool):
        self.curve, self.refused, self.port = curve, 0, None
        self._users = {os.geteuid(), 0}  # root can read the run's key anyway
        router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        router.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_SECONDS * 1000))
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        self._zap = ctx.socket(zmq.ROUTER)  # ZAP handler: ZeroMQ asks it about each handshake
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind("inproc://zeromq.zap.01")
        self.sockets = [self._zap]
        self._client = self._events = None
        if curve:
            _, server_secret, client_public, _ = curve_keys(key)
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
            self._client = z85.decode(client_public)
        else:
            # Each connection's descriptor as it is accepted, before its handshake starts.
            events = f"inproc://hangkit-monitor-accepts-{id(self)}"
            router.monitor(events, zmq.EVENT_ACCEPTED)
            self._events = ctx.socket(zmq.PAIR)
            self._events.setsockopt(zmq.LINGER, 0)
            self._events.setsockopt(zmq.RCVHWM, 0)  # never lose one, never block ZeroMQ's thread
            self._events.connect(events)
            self.sockets.append(self._events)

    def listening(self, port: int) -> None:
        self.port = port

    def step(self) -> None:
        """New connections looked at, then the handshakes waiting answered: a connection's
        accept comes before its handshake, so none is answered before it was looked at."""
        if self._events is not None:
            while True:
                try:
                    frames = self._events.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                event, fd = struct.unpack_from("=HI", frames[0])
                if event == zmq.EVENT_ACCEPTED:
                    self._look_at(fd)
        while True:
            try:
                request = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [peer, b"", version, request id, domain, address, routing id, mechanism, *creds]
            if len(request) < 8:
                continue
            mechanism, credentials = request[7], request[8:]
            ok = (mechanism == b"CURVE" and credentials[:1] == [self._client]) if self.curve \
                else mechanism == b"NULL"
            self.refused += not ok
            self._zap.send_multipart([request[0], b"", b"1.0", request[3],
                                      b"200" if ok else b"400", b"", b"", b""])

    def _look_at(self, fd: int) -> None:
        """Shuts a connection down unless its other end is this user's (or root's) on this
        host. The descriptor is ZeroMQ's: looked at through a duplicate, and only while it
        still is a connection to our port (a number reused since is left alone)."""
        try:
            copy = os.dup(fd)
        except OSError:
            return  # closed already
        try:
            conn = socket.socket(fileno=copy)
        except OSError:
            os.close(copy)
            return
        with conn:
            try:
                local, peer = conn.getsockname(), conn.getpeername()
            except OSError:
                return
            if conn.type != socket.SOCK_STREAM or local[1] != self.port:
                return
            try:
                uid = peer_uid(peer, local)
            except (OSError, ValueError):  # the kernel cannot say (no sock_diag, no /proc)
                log.debug("the user of %s not known: let in", peer, exc_info=True)
                return
            if uid not in self._users:
                self.refused += 1
                log.debug("refused %s: its user is %s", peer, uid)
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
