"""`hangkit rank -- COMMAND`: one rank's parent, between the launcher and the rank.

Before the rank starts it gets the GPU of its local rank (CUDA_VISIBLE_DEVICES; set after
mpi4py or torch initialised CUDA it would bind the wrong device: MP-06), a TMPDIR that exists on
this node, and, under a monitor, the node relay's endpoint. The rank is started with the shim
named as its ptracer (Yama's PR_SET_PTRACER) and with a parent-death signal, so it never
outlives its shim; the shim takes the parent-death signal of its own launcher, and is the
subreaper of the rank's tree, so nothing of the rank outlives the launcher either.

Then the shim waits in one poll on its relay socket and a signal pipe: signals it receives
(SIGTERM, SIGINT, ...) go to the rank; the relay's requests (capture, sample, signal, end) are
answered from tree.py; the rank's exit is reported the moment it happens. It exits with the
rank's code (128 + N when a signal ended it), after ending what the rank left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import uuid

from hangkit.bootstrap import WATCHER_VARIABLE
from hangkit.errors import UsageError
from hangkit.flight_recorder.environment import NCCL_PIPE_VARIABLE
from hangkit.inject import inject_environment, needs_own_hook, remove_hook
from hangkit.monitor.nccl_pipe import remove_pipes
from hangkit.rankenv import RANK_VARIABLES, local_rank_from_environ, rank_from_environ
from hangkit.shim import MADE_MARK, RELAY_VARIABLE, SHIM_MARKER, relay_paths
from hangkit.transport import Signer, Verifier, monitor_from_environ

HELLO_RETRY = 0.5  # seconds between hellos until the relay welcomes this shim
EXIT_LINGER_MS = 500  # for the exit report to leave before the shim does
LEFTOVER_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for what the rank left running
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PTRACER = 0x59616D61  # Yama; fails harmlessly (EINVAL) where Yama is not there


def gpu_for(env: dict[str, str]) -> str | None:
    """The CUDA_VISIBLE_DEVICES this rank should have: its local rank, or the local rank-th of
    the devices already listed; None to leave it as it is (no local rank, or one device)."""
    local = local_rank_from_environ(env)
    if local is None:
        return None
    listed = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(listed) == 1:
        return None
    return listed[local % len(listed)] if listed else str(local)


def rank_environment(environ: dict[str, str], *, bind_gpu: bool) -> dict[str, str]:
    env = dict(environ)
    if bind_gpu:
        gpu = gpu_for(env)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
    tmpdir = env.get("TMPDIR")
    if tmpdir and not os.path.isdir(tmpdir):  # made on the job's first node only, by its script
        with contextlib.suppress(OSError):
            os.makedirs(tmpdir, mode=0o700, exist_ok=True)
            open(os.path.join(tmpdir, MADE_MARK), "w").close()
    found = monitor_from_environ(env)
    if found is not None:
        env[RELAY_VARIABLE] = relay_paths(found[1])[0]
    env[SHIM_MARKER] = uuid.uuid4().hex
    env.pop(WATCHER_VARIABLE, None)  # the rank is known by its variables, not as watch's child
    return env


def start_relay(env: dict[str, str]) -> subprocess.Popen | None:
    """The node's relay, when this shim is the node's first (it holds the lock, and hands it
    to the relay, which holds it while it runs); None on every other shim."""
    found = monitor_from_environ(env)
    if found is None:
        return None
    endpoint, lock_path = relay_paths(found[1])
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    # No rank variables: the relay is nobody's rank, and no shim's marker: it is in no tree.
    relay_env = {k: v for k, v in env.items() if k not in RANK_VARIABLES and k != SHIM_MARKER}
    try:
        # A session of its own: launchers SIGKILL their ranks' process groups, and the relay
        # must end by itself (its SIGTERM, or its shims gone) to remove its socket and lock.
        return subprocess.Popen([sys.executable, "-m", "hangkit.shim.relay", endpoint, str(fd),
                                 lock_path, str(os.getpid())], env=relay_env, pass_fds=(fd,),
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None
    finally:
        os.close(fd)


def run(command: list[str], *, bind_gpu: bool = True) -> int:
    """Runs COMMAND as this rank; returns its exit code (128 + N for signal N)."""
    from hangkit.monitor.watch import resolve_command

    executable = resolve_command(command)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # our launcher went: end the rank
    env = rank_environment(dict(os.environ), bind_gpu=bind_gpu)
    relay = start_relay(env)
    shim_pid = os.getpid()
    # The rank's own hook where the job's (watch's) is not on this node.
    hook = None
    if needs_own_hook(env):
        env, hook = inject_environment(env)

    def in_child() -> None:  # between fork and exec: no Python objects beyond these calls
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        libc.prctl(_PR_SET_PTRACER, shim_pid, 0, 0, 0)

    try:
        try:
            # close_fds=False: the launcher's descriptors are the rank's (hydra's PMI_FD, ...).
            child = subprocess.Popen([executable, *command[1:]], env=env, preexec_fn=in_child,
                                     close_fds=False)
        except OSError as e:
            raise UsageError(f"cannot start {command[0]}: {e.strerror or e}") from None
        return Shim(child.pid, env, relay_pid=relay.pid if relay else None).run()
    finally:
        remove_hook(hook)
        remove_pipes(env.get(NCCL_PIPE_VARIABLE), rank_from_environ(env))


class Shim:
    """The waiting part: one poll over the relay socket and a signal pipe."""

    def __init__(self, child: int, env: dict[str, str], *, relay_pid: int | None):
        self.child, self.env, self.relay_pid = child, env, relay_pid
        self.code: int | None = None  # the rank's exit code once it ended (-N: signal N)
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd says it
        for s in FORWARDED:
            signal.signal(s, self._forward)
        self.sock = None
        found = monitor_from_environ(env)
        if found is not None and RELAY_VARIABLE in env:
            import zmq

            self.zmq = zmq
            self.ctx = zmq.Context()
            self.sock = self.ctx.socket(zmq.DEALER)
            for option, value in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.SNDHWM, 16)):
                self.sock.setsockopt(option, value)
            self.sock.connect(env[RELAY_VARIABLE])
            self.signer, self.verifier = Signer(found[1]), Verifier(found[1])
        self.welcomed = self.sock is None
        self.rank = rank_from_environ(env)
        self.exclude = {relay_pid} if relay_pid else set()

    def _forward(self, signum, _frame) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.child, signum)

    def run(self) -> int:
        import select

        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        zpoller = None
        if self.sock is not None:
            zpoller = self.zmq.Poller()
            zpoller.register(self.sock, self.zmq.POLLIN)
            zpoller.register(self._wake_r, self.zmq.POLLIN)
        while True:
            self._reap()
            if self.code is not None:
                return self._exited()
            if not self.welcomed:
                self._send(self._hello())
            timeout = None if self.welcomed else HELLO_RETRY * 1000
            with contextlib.suppress(InterruptedError):
                ready = dict(zpoller.poll(timeout)) if zpoller else dict(poller.poll(timeout))
                if self.sock is not None and self.sock in ready:
                    self._answer()
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)

    def _reap(self) -> None:
        """Collects every child that ended (orphans of the rank's tree come here too)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.code = os.waitstatus_to_exitcode(status)
            elif pid == self.relay_pid and os.WIFSIGNALED(status):
                self._remove_relay_files()

    def _remove_relay_files(self) -> None:
        """A relay killed by a signal could not remove its socket and lock; its lock is free now,
        so they are nobody's. (The TMPDIR stays: the node's ranks may still be using it.)"""
        from hangkit.shim.relay import remove_relay_files

        found = monitor_from_environ(self.env)
        if found is not None:
            remove_relay_files(*relay_paths(found[1]))

    def _hello(self) -> dict:
        return {"type": "hello", "rank": self.rank, "local_rank": local_rank_from_environ(
            self.env), "shim_pid": os.getpid(), "pid": self.child, "host": socket.gethostname()}

    def _answer(self) -> None:
        from hangkit.shim import tree

        zmq = self.zmq
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            m = self.verifier.open(frames) or {}
            kind, rid = m.get("type"), m.get("request")
            reply = _REPLIES.get(kind)
            try:
                if kind == "welcome":
                    self.welcomed = True
                elif kind == "capture?":
                    self._send({"type": "captured", "request": rid, "snapshots": tree.capture(
                        self.child, m, exclude=self.exclude)})
                elif kind == "sample?":
                    self._send({"type": "sampled", "request": rid, "samples": tree.sample(
                        self.child, m, exclude=self.exclude)})
                elif kind == "signal?":
                    self._send({"type": "signalled", "request": rid, "result": tree.send_signal(
                        self.child, int(m["signal"]), tree=bool(m.get("tree")),
                        exclude=self.exclude)})
                elif kind == "end?":
                    result = self._end(float(m.get("grace", LEFTOVER_GRACE)))
                    self._send({"type": "ended", "request": rid, "result": result})
            except Exception as e:  # an answer saying why beats the relay's timeout
                if reply is not None:
                    self._send({"type": reply, "request": rid,
                                "error": f"{type(e).__name__}: {e}"})

    def _end(self, grace: float) -> str:
        from hangkit.monitor.terminate import end_job

        tree = _Tree(self)
        result = end_job(tree, grace=grace)
        if self.code is None and tree.rank_code is not None:
            self.code = tree.rank_code  # psutil reaped the rank while waiting for it to end
        return (f"{len(result.terminated)} ended by SIGTERM, {len(result.killed)} by SIGKILL"
                + (f", {len(result.survivors)} still there" if result.survivors else "")
                + (f", removed {len(result.removed)} file(s) from /dev/shm" if result.removed
                   else ""))

    def _exited(self) -> int:
        code = self.code
        self._send({"type": "exit", "rank": self.rank, "pid": self.child,
                    "code": code if code >= 0 else None, "signal": -code if code < 0 else None})
        self._end(LEFTOVER_GRACE)  # what the rank left running: workers, daemons
        if self.sock is not None:
            self.sock.close(linger=EXIT_LINGER_MS)
            self.ctx.term()
        return 128 - code if code < 0 else code

    def _send(self, message: dict) -> None:
        if self.sock is None:
            return
        with contextlib.suppress(self.zmq.ZMQError):  # no relay (yet): dropped
            self.sock.send_multipart(self.signer.frames(message), self.zmq.NOBLOCK)


# The reply to each request of the relay's.
_REPLIES = {"capture?": "captured", "sample?": "sampled", "signal?": "signalled",
            "end?": "ended"}


class _Tree:
    """The rank's tree as monitor/terminate.end_job sees a job: the processes below the shim
    (but not its relay), and those carrying the shim's marker wherever they went."""

    def __init__(self, shim: Shim):
        self.root_pid, self.shim = shim.child, shim
        self._rank = None  # its psutil.Process: psutil.wait_procs keeps the exit code there

    @property
    def rank_code(self) -> int | None:
        return getattr(self._rank, "returncode", None)

    def processes(self) -> list:
        import psutil

        from hangkit.procfs import read_environ
        from hangkit.shim.tree import tree_pids

        marker = self.shim.env[SHIM_MARKER]
        pids = set(tree_pids(self.root_pid, exclude=self.shim.exclude))
        for pid in psutil.pids():
            if pid != os.getpid() and (read_environ(pid) or {}).get(SHIM_MARKER) == marker:
                pids.add(pid)
        found = []
        for pid in sorted(pids - self.shim.exclude):
            with contextlib.suppress(psutil.Error):
                if pid == self.root_pid:
                    self._rank = self._rank or psutil.Process(pid)
                    found.append(self._rank)
                else:
                    found.append(psutil.Process(pid))
        return found
