"""The sidecar: one daemon thread per rank that publishes progress and answers stack requests.

It talks to the monitor over one ZeroMQ DEALER socket. Sends never block: the socket has a small
high-water mark, connects lazily (IMMEDIATE), and a beat that cannot go out now is dropped and
counted. A monitor that is slow, gone or never there costs the rank nothing but that count.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback

from hangkit import deadline
from hangkit.agent import beacon, recorder
from hangkit.agent.threadstacks import FaultDump, current_stacks
from hangkit.bootstrap import INJECT_VARIABLE
from hangkit.errors import UsageError
from hangkit.rankenv import rank_from_environ, world_size_from_environ
from hangkit.records import Beat, CollectiveState
from hangkit.shim import RELAY_VARIABLE
from hangkit.transport import Signer, Verifier, monitor_from_environ, secure_client

log = logging.getLogger(__name__)

INTERVAL = 1.0  # a beat at least this often
TICK = 0.1  # how often the sidecar looks at the progress state, and its timing resolution
MIN_GAP = 0.2  # a phase or collective held this long is published at once, not more often
SEND_HWM = 8
# A Flight Recorder dump takes milliseconds while the main thread waits; one that has not
# returned by then (its symbolising fights a busy main thread for the GIL) is left behind.
RECORDING_SECONDS = 3.0
BYE_LINGER_MS = 200

_agent: Agent | None = None
_lock = threading.Lock()


class Agent:
    def __init__(self, address: str, key: str, *, rank: int | None = None,
                 world_size: int | None = None, interval: float = INTERVAL):
        import zmq  # imported here: a rank without a monitor never loads it

        self.address, self.interval = address, interval
        env = os.environ
        self.rank = rank if rank is not None else rank_from_environ(env)
        self.world_size = world_size if world_size is not None else world_size_from_environ(env)
        self.signer = Signer(key)
        self.verifier = Verifier(key)
        self.dropped_beats = 0
        self.host = socket.gethostname()
        self._zmq = zmq
        self._ctx = zmq.Context()  # our own: the application may use zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.SNDHWM, SEND_HWM),
                              (zmq.RCVHWM, SEND_HWM)):
            self._sock.setsockopt(option, value)
        secure_client(self._sock, address, key)  # CurveZMQ to a monitor beyond loopback
        self._sock.connect(address)
        # In the job's hook directory where there is one: removed with the job, even when the
        # rank is killed before it could remove its file itself.
        hook = env.get(INJECT_VARIABLE, "")
        self.fault_dump = FaultDump(hook if os.path.isabs(hook) and os.path.isdir(hook) else None)
        self._stop = threading.Event()
        # Set once a beat has gone out: the monitor knows this rank from then on.
        self.reported = threading.Event()
        self._seen_calls = -1
        self._seen_phase = self._seen_collective = object()
        self._progress_at = self._phase_at = self._collective_at = time.monotonic()
        self._sent_at = float("-inf")
        self._sent_phase = object()
        self._sent_collective = None
        self._live = recorder.LiveCollective()
        self._thread = threading.Thread(target=self._run, name="hangkit-sidecar", daemon=True)

    def start(self) -> Agent:
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Says goodbye to the monitor (so a finished rank is not taken for a dead one)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._send({"type": "bye", **self._beat().to_json()})
        # A short linger lets the goodbye leave; with no monitor connected nothing is queued
        # (IMMEDIATE), so this never waits longer than BYE_LINGER_MS.
        self._sock.close(linger=BYE_LINGER_MS)
        self._ctx.term()
        self.fault_dump.close()

    # The thread

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if poller.poll(TICK * 1000):
                    self._answer_requests()
                self._look(time.monotonic())
            except Exception:  # the sidecar must outlive anything a message or state holds
                log.debug("sidecar iteration failed", exc_info=True)
                self._stop.wait(TICK)

    def _look(self, now: float) -> None:
        s = beacon.state
        if s.calls != self._seen_calls:
            self._seen_calls, self._progress_at = s.calls, now
        if s.phase != self._seen_phase:
            self._seen_phase, self._phase_at = s.phase, now
        if s.collective is not self._seen_collective:
            self._seen_collective, self._collective_at = s.collective, now
        due = now - self._sent_at >= self.interval
        if not due and now - self._sent_at >= MIN_GAP:
            # A new phase or collective the rank stays in is news: it is what a stalled rank
            # is stuck in. One it passes through (every step of a fast loop) is not: the
            # regular beat says where the loop is, and the rank is spared a beat per change.
            due = (s.phase != self._sent_phase and now - self._phase_at >= MIN_GAP) or (
                s.collective is not self._sent_collective
                and now - self._collective_at >= MIN_GAP)
        if due:
            self._sent_at, self._sent_phase, self._sent_collective = now, s.phase, s.collective
            if self._send({"type": "beat", **self._beat(now).to_json()}):
                self.reported.set()
            else:
                self.dropped_beats += 1

    def _beat(self, now: float | None = None) -> Beat:
        now = time.monotonic() if now is None else now
        s = beacon.state
        collective = None
        if s.collective is not None:
            library, comm, op, seq, entered = s.collective
            collective = CollectiveState(library, comm, op, seq, inside=entered is not None,
                                         seconds=round(now - entered, 3) if entered else 0.0)
        else:  # DDP's and FSDP's collectives, issued from C++: as torch's recorder counts them
            try:
                collective = self._live.read()
            except Exception:
                log.debug("flight recorder status not read", exc_info=True)
        return Beat(
            pid=os.getpid(), host=self.host, rank=self.rank, world_size=self.world_size,
            step=_plain(s.step), phase=None if s.phase is None else str(s.phase),
            phase_seconds=round(now - self._phase_at, 3), calls=s.calls,
            since_progress=round(now - self._progress_at, 3),
            fields={str(k): _plain(v) for k, v in list(s.fields.items())},
            collective=collective, collective_seconds=round(s.collective_seconds, 4),
            dump_file=self.fault_dump.path, dump_signal=self.fault_dump.signum,
            main_ident=threading.main_thread().ident, error=s.error,
            workers=list(s.workers), extra=dict(s.extra), sent_at=time.time())

    def _answer_requests(self) -> None:
        zmq = self._zmq
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            request = self.verifier.open(frames) or {}
            kind, rid = request.get("type"), request.get("request")
            if kind == "stacks?":
                self._send({"type": "stacks", "request": rid, "pid": os.getpid(),
                            "rank": self.rank, "threads": [t.to_json() for t in current_stacks()
                                                           if t.name != "hangkit-sidecar"]})
            elif kind == "recording?":
                dump, error = _recording()
                self._send({"type": "recording", "request": rid, "pid": os.getpid(),
                            "rank": self.rank, "recording": dump, "error": error})

    def _send(self, message: dict) -> bool:
        try:
            self._sock.send_multipart(self.signer.frames(message), self._zmq.NOBLOCK)
            return True
        except self._zmq.ZMQError:  # Again (no monitor yet, or it is slow), or closed
            return False


def _recording() -> tuple[dict | None, str | None]:
    """(this rank's Flight Recorder dump, None) or (None, why there is none): no dump is an
    answer too, and the report names the rank with the reason."""
    try:
        dump = deadline.call(recorder.recording, timeout=RECORDING_SECONDS,
                             name="flight recorder dump")
    except deadline.DeadlineExceeded:
        return None, f"its dump did not return within {RECORDING_SECONDS:g} s"
    except Exception as e:
        log.debug("flight recorder not dumped", exc_info=True)
        return None, f"its dump failed: {type(e).__name__}: {e}"
    if dump is None:
        return None, ("its agent read no recorder: no process group, TORCH_FR_BUFFER_SIZE=0, "
                      "or a torch without one for this backend")
    return dump, None


def _plain(value):
    """What JSON can carry: numbers and strings as they are, anything else as its text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:
        return value.item()  # a 0-d tensor or numpy scalar
    except Exception:
        return str(value)


def start_agent(address: str | None = None, key: str | None = None, *, rank: int | None = None,
                world_size: int | None = None) -> Agent | None:
    """Starts this process's agent (once). Address and key default to the environment's (the
    node relay's endpoint where a shim set one); returns None when neither is given. Reporting
    never blocks or raises into training."""
    global _agent
    with _lock:
        if _agent is not None:
            return _agent
        if address is None or key is None:
            found = monitor_from_environ()
            if found is None:
                return None
            # Under `hangkit rank`, beats go to the node's relay, which batches them.
            address = address or os.environ.get(RELAY_VARIABLE) or found[0]
            key = key or found[1]
        try:
            _agent = Agent(address, key, rank=rank, world_size=world_size).start()
        except Exception as e:  # zmq.ZMQError: an address zmq cannot parse
            raise UsageError(f"cannot report to the monitor at {address!r}: {e}") from e
        beacon.skip_autostart()
        atexit.register(stop_agent)
        _chain_excepthook()
        return _agent


def start_from_environ() -> Agent | None:
    # A multiprocessing child (a spawned DataLoader worker) inherits the environment but is
    # not a rank: it stays quiet.
    if multiprocessing.parent_process() is not None:
        return None
    return start_agent()


def stop_agent() -> None:
    global _agent
    with _lock:
        agent, _agent = _agent, None
    if agent is not None:
        agent.stop()


def current_agent() -> Agent | None:
    return _agent


def _chain_excepthook() -> None:
    """An exception that ends the main thread is reported, so the rank shows as errored."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        with contextlib.suppress(Exception):
            beacon.state.error = "".join(traceback.format_exception_only(kind, value)).strip()
        previous(kind, value, tb)

    sys.excepthook = hook


_inherited: list[Agent] = []


def _forget_in_child() -> None:
    # The thread did not survive the fork, and the zmq context must not be touched (not even
    # closed by the garbage collector) in the child: keep a reference, stop using it.
    global _agent
    if _agent is not None:
        _inherited.append(_agent)
    _agent = None


os.register_at_fork(after_in_child=_forget_in_child)
