"""PID 1 of a simulated node (tests/simnodes.py): reaps orphans and runs commands for simssh.

It stands in for Cray PALS's per-node daemon, which on Polaris starts a launcher's processes on
each node and ends them when the launcher goes. Here the "launcher" is a simssh client: each
connection carries one command (simproto.py), started in a session of its own with its output
relayed back; when the client's connection ends before the command did (the client was
killed), every process of that session gets SIGTERM, then SIGKILL after TERM_GRACE seconds.

Being PID 1 of a PID namespace, it inherits every orphan of the node, and reaps them: otherwise
they would stay zombies. The kernel also drops any signal sent to it for which it has no
handler, so it handles SIGTERM, SIGHUP and SIGINT by exiting (and logging), which ends the node.
The harness ends a node with SIGKILL, which the kernel always delivers: PID 1 dies and the
kernel kills every process of its namespace.

usage: noded.py --listen-fd FD --token-file PATH   (logs on stderr; prints "ready" on stdout)
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import simproto

TERM_GRACE = 5.0  # seconds from SIGTERM to SIGKILL for a session whose client went
_POLL = 0.05


def log(message: str) -> None:
    print(f"noded[{socket.gethostname()}]: {message}", file=sys.stderr, flush=True)


class Reaper:
    """Waits for every child (the commands, and the orphans the kernel hands to PID 1) and
    gives a command's wait status to the connection that started it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Connection] = {}
        self._wake = threading.Event()

    def wake(self) -> None:
        """Called on SIGCHLD: an orphan may have been handed to us while we had no child."""
        self._wake.set()

    def spawn(self, owner: Connection, argv: list[str], **popen_args) -> subprocess.Popen:
        # Under the lock the reaper takes to look a pid up: a command that ends at once is
        # not mistaken for an orphan.
        with self._lock:
            proc = subprocess.Popen(argv, **popen_args)
            self._waiting[proc.pid] = owner
        self._wake.set()
        return proc

    def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No child, so no process in the namespace but us: wait for one to appear.
                self._wake.wait()
                continue
            with self._lock:
                owner = self._waiting.pop(pid, None)
            if owner is not None:
                owner.exited(status)


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`, as this namespace's /proc shows them."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if os.getsid(int(name)) != sid:
                continue
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            found.append(int(name))
    return found


def signal_session(sid: int, signum: int) -> list[int]:
    members = session_members(sid)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return members


def end_session(sid: int) -> None:
    """SIGTERM to every process of the session, SIGKILL to those left after TERM_GRACE."""
    signal_session(sid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(_POLL)  # ok-sleep: polls the session's processes, with a deadline
    killed = signal_session(sid, signal.SIGKILL)
    if killed:
        log(f"session {sid}: SIGKILL to {killed}, still there {TERM_GRACE:.0f} s after SIGTERM")


class Connection:
    """One client, one command."""

    def __init__(self, sock: socket.socket, reaper: Reaper, token: str) -> None:
        self.sock = sock
        self.reaper = reaper
        self.token = token
        self.send_lock = threading.Lock()
        self.status: int | None = None  # the command's wait status, once reaped
        self.exit_known = threading.Event()
        self.finished = threading.Event()  # EXIT sent: the client may go now
        self.client_gone = False

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        if self.client_gone:
            return
        try:
            with self.send_lock:
                simproto.send(self.sock, kind, payload)
        except OSError:
            self.client_gone = True

    def exited(self, status: int) -> None:
        self.status = status
        self.exit_known.set()

    def serve(self) -> None:
        try:
            self._serve()
        except (OSError, simproto.ProtocolError, ValueError, KeyError, TypeError) as e:
            log(f"connection ended: {type(e).__name__}: {e}")
        finally:
            self.sock.close()

    def _serve(self) -> None:
        first = simproto.receive(self.sock)
        if first is None or first[0] != simproto.REQUEST:
            return
        request = json.loads(first[1])
        if not hmac.compare_digest(str(request.get("token")).encode(), self.token.encode()):
            log("refused a request without the right token")
            self.send(simproto.FAILED, b"wrong or missing token")
            return
        argv = [str(word) for word in request["argv"]]
        try:
            proc = self.reaper.spawn(
                self, argv, env=request.get("env") or os.environ, cwd=request.get("cwd"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
        except OSError as e:  # not found, not executable, no such cwd: as a shell says it
            log(f"cannot start {' '.join(argv)[:200]}: {e}")
            self.send(simproto.STDERR, f"simnodes: {argv[0]}: {e}\n".encode())
            code = 127 if isinstance(e, FileNotFoundError) else 126
            simproto.send_json(self.sock, simproto.EXIT, {"code": code})
            return
        log(f"pid {proc.pid}: {' '.join(argv)[:200]}")
        stdin: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        pumps = [self._thread(self._pump, proc.stdout, simproto.STDOUT),
                 self._thread(self._pump, proc.stderr, simproto.STDERR)]
        self._thread(self._feed, proc, stdin)
        self._thread(self._finish, proc, pumps)
        # Relay the client's stdin until its connection ends; a blocked write to the command
        # happens in _feed, so that the end of the connection is always seen here.
        while True:
            try:
                frame = simproto.receive(self.sock)
            except (OSError, simproto.ProtocolError):
                frame = None
            if frame is None:
                break
            if frame[0] == simproto.STDIN:
                stdin.put(frame[1] or None)
        self.client_gone = True
        if not self.finished.is_set():
            log(f"client of pid {proc.pid} ({' '.join(argv)[:200]}) went: ending its session")
            end_session(proc.pid)

    @staticmethod
    def _thread(target, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        return thread

    def _pump(self, pipe, kind: bytes) -> None:
        # Reads to the end even when the client is gone: a command must never block on a full
        # pipe while its session is being ended.
        while chunk := os.read(pipe.fileno(), simproto.CHUNK):
            self.send(kind, chunk)
        pipe.close()

    @staticmethod
    def _feed(proc: subprocess.Popen, stdin: queue.SimpleQueue) -> None:
        with contextlib.suppress(OSError):  # the command closed its stdin, or ended
            while (data := stdin.get()) is not None:
                proc.stdin.write(data)
                proc.stdin.flush()
        with contextlib.suppress(OSError):
            proc.stdin.close()

    def _finish(self, proc: subprocess.Popen, pumps: list[threading.Thread]) -> None:
        """EXIT once the command has ended and its output is all sent, as ssh does."""
        self.exit_known.wait()
        code = os.waitstatus_to_exitcode(self.status)
        proc.returncode = code  # reaped already: Popen must never wait for this pid again
        for pump in pumps:
            pump.join()
        self.finished.set()
        with contextlib.suppress(OSError), self.send_lock:
            simproto.send_json(self.sock, simproto.EXIT,
                               {"signal": -code} if code < 0 else {"code": code})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    args = parser.parse_args()
    token = args.token_file.read_text().strip()
    listener = socket.socket(fileno=args.listen_fd)
    reaper = Reaper()
    signal.signal(signal.SIGCHLD, lambda *_: reaper.wake())

    def leave(signum: int, _frame) -> None:
        log(f"{signal.Signals(signum).name}: exiting, which ends every process of this node")
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, leave)
    threading.Thread(target=reaper.run, daemon=True).start()
    host, port = listener.getsockname()[:2]
    log(f"pid {os.getpid()}, serving on {host}:{port}")
    print("ready", flush=True)  # the harness waits for this line
    # Nothing more for the harness: a write to a pipe it has closed must not kill us.
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=Connection(conn, reaper, token).serve, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
