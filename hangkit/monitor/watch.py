"""`hangkit watch`: run a command, pass its output through, and on a hang capture, report, end.

The loop is a single select() over the job's two output pipes and a pidfd for its first
process, so the watcher costs next to nothing while the job runs. Beside it, a Monitor thread
receives the progress beats of ranks that call hangkit.progress(); the loop wakes every TICK
seconds to run stall detection over them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hangkit.envsetup import hang_safe_environment
from hangkit.errors import UsageError, check_positive_seconds, check_seconds_or_zero
from hangkit.monitor.jobtree import MARKER_VARIABLE, JobTree, become_subreaper
from hangkit.monitor.output import OutputTail, write_all
from hangkit.monitor.server import Monitor
from hangkit.monitor.stall import HANG_KINDS, StallConfig
from hangkit.monitor.terminate import end_job
from hangkit.records import StallEvent

HANG_EXIT = 124
# Larger pipes let a job write bursts without waiting for the watcher to be scheduled.
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031
# After the first process exits, output still in the pipes is read for at most this long.
DRAIN_SECONDS = 2.0
# How often stall detection runs over the ranks' progress (and, without a pidfd on kernels
# before 5.3, how often the first process is polled).
TICK = 0.25


@dataclass
class WatchOptions:
    command: list[str]
    timeout: float
    grace: float = 30.0
    report_dir: Path | None = None
    setup_env: bool = True
    progress_timeout: float | None = None  # None: progress is reported, never a hang by itself
    bind: str = "127.0.0.1"  # where the monitor listens for the ranks' agents


@dataclass
class _ProgressHang:
    """A stall of the ranks' progress that counts as a hang (--progress-timeout)."""

    event: StallEvent
    since: float  # seconds since the stopped ranks last advanced


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def resolve_command(command: list[str]) -> str:
    if not command:
        raise UsageError("no command given: use hangkit watch [options] -- COMMAND [ARGS...]")
    found = shutil.which(command[0])
    if found is None:
        raise UsageError(f"command not found: {command[0]}")
    return found


def say(line: str) -> None:
    write_all(2, f"hangkit: {line}\n".encode())


def watch(opts: WatchOptions) -> int:
    """Runs the command to its end or its hang. Returns the exit code for the watcher."""
    check_positive_seconds("timeout", opts.timeout)
    check_seconds_or_zero("grace", opts.grace)
    if opts.progress_timeout is not None:
        check_positive_seconds("progress_timeout", opts.progress_timeout)
    executable = resolve_command(opts.command)
    env = dict(os.environ)
    tmpdir = None
    if opts.setup_env:
        env, changes, tmpdir = hang_safe_environment(env)
        for change in changes:
            say(f"set {change}")
    marker = uuid.uuid4().hex
    env[MARKER_VARIABLE] = marker
    stall_after = opts.progress_timeout or opts.timeout
    # A desync must be established before the stall it causes is reported as a hang.
    monitor = Monitor(bind=opts.bind, config=StallConfig(
        stall_after=stall_after, desync_after=min(2.0, stall_after / 2)))
    env.update(monitor.environment())
    become_subreaper()
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        try:
            proc = subprocess.Popen([executable, *opts.command[1:]], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, bufsize=0)
            watcher = _Watcher(opts, proc, JobTree(proc.pid, marker), env, monitor)
        except _Interrupted as e:  # before the loop could take it: end what was started
            if proc is not None:
                end_job(JobTree(proc.pid, marker), grace=opts.grace)
                proc.wait()
            return 128 + e.signum
        return watcher.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        monitor.close()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _raise_interrupted(signum, _frame):
    raise _Interrupted(signum)


class _Watcher:
    def __init__(self, opts: WatchOptions, proc: subprocess.Popen, tree: JobTree, env: dict,
                 monitor: Monitor):
        self.opts, self.proc, self.tree, self.env = opts, proc, tree, env
        self.monitor = monitor
        self.tail = OutputTail()
        self.started = time.time()
        self.last_output = time.monotonic()
        self.sel = selectors.DefaultSelector()
        self.forward = {proc.stdout.fileno(): 1, proc.stderr.fileno(): 2}
        for fd in self.forward:
            with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size
                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
            self.sel.register(fd, selectors.EVENT_READ, "output")
        try:
            self.pidfd = os.pidfd_open(proc.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            self.pidfd = None  # kernels before 5.3: poll the child instead

    def run(self) -> int:
        try:
            return self._loop()
        except _Interrupted as e:
            say(f"received {signal.Signals(e.signum).name}: ending the job")
            self._end()
            return 128 + e.signum
        finally:
            self.sel.close()
            if self.pidfd is not None:
                os.close(self.pidfd)
            self.proc.stdout.close()
            self.proc.stderr.close()

    def _loop(self) -> int:
        while True:
            idle = time.monotonic() - self.last_output
            if idle >= self.opts.timeout:
                return self._hang(idle)
            wait = min(self.opts.timeout - idle, TICK)
            for key, _ in self.sel.select(timeout=wait):
                if key.data == "exit":
                    return self._finished()
                self._pump(key.fd)
            if self.pidfd is None and self.proc.poll() is not None:
                return self._finished()
            stalled = self._check_progress()
            if stalled is not None:
                return self._hang(stalled.since, detector="progress", reason=(
                    f"{stalled.event.summary} (--progress-timeout "
                    f"{self.opts.progress_timeout:g})"))

    def _check_progress(self) -> _ProgressHang | None:
        """Runs stall detection; says each new finding; returns a stall that counts as a hang."""
        hang = None
        for event in self.monitor.detect():
            say(f"[{event.kind}] {event.summary}")
            if self.opts.progress_timeout is not None and event.kind in HANG_KINDS:
                since = min((r.since_progress for r in self.monitor.statuses()
                             if r.rank in event.ranks), default=self.opts.progress_timeout)
                hang = _ProgressHang(event, since)
        return hang

    def _pump(self, fd: int) -> None:
        """Moves one chunk from the job to our stream; stops watching fd at end of file."""
        try:
            data = os.read(fd, PIPE_BYTES)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fd)
            return
        self.last_output = time.monotonic()
        target = self.forward[fd]
        if target is not None and not write_all(target, data):
            self.forward[fd] = None  # our reader left; keep draining so the job never blocks
        self.tail.feed(fd, data)

    def _finished(self) -> int:
        """The first process exited: drain its output, end any leftovers, pass its code on."""
        code = self.proc.wait()
        if self.pidfd is not None:
            self.sel.unregister(self.pidfd)
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.sel.get_map() and time.monotonic() < deadline:
            for key, _ in self.sel.select(timeout=deadline - time.monotonic()):
                self._pump(key.fd)
        leftovers = self.tree.processes()
        if leftovers:
            result = end_job(self.tree, grace=self.opts.grace)
            say(f"ended {len(result.terminated) + len(result.killed)} process(es) the command "
                f"left running: {', '.join(str(p.pid) for p in leftovers)}")
        return 128 - code if code < 0 else code

    def _hang(self, idle: float, *, detector: str = "output", reason: str | None = None) -> int:
        # Imported here: a job that never hangs should not pay for them at start-up.
        from hangkit.monitor.capture import capture_job
        from hangkit.monitor.jobcontext import job_context
        from hangkit.monitor.report import build_report, render_summary

        reason = reason or f"no output for {idle:.0f} s (--timeout {self.opts.timeout:g})"
        say(f"{reason}: capturing stacks of every process of the job")
        t0 = time.monotonic()
        ranks = self.monitor.statuses()
        snapshots = capture_job(self.monitor, ranks, self.tree.pids())
        context = {**job_context(self.env), "monitor": self.monitor.stats()}
        report = build_report(
            reason=reason, command=self.opts.command, idle_seconds=idle,
            processes=snapshots, last_lines=self.tail.lines(), context=context,
            started_at=self.started, capture_seconds=time.monotonic() - t0, detector=detector,
            ranks=ranks, events=self.monitor.active_events())
        paths = self._write(report)
        for line in render_summary(report):
            write_all(2, (line + "\n").encode())
        self._end()
        if paths:
            say(f"report: {paths[1]} (and {paths[0].name} beside it)")
        return HANG_EXIT

    def _write(self, report):
        from hangkit.monitor.report import write_report

        directory = self.opts.report_dir or Path(
            f"hangkit-report-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            return write_report(report, directory)
        except OSError as e:
            fallback = Path(tempfile.mkdtemp(prefix="hangkit-report-"))
            say(f"cannot write the report to {directory} ({e.strerror}); writing to {fallback}")
            try:
                return write_report(report, fallback)
            except OSError as e2:
                say(f"cannot write the report to {fallback} either ({e2.strerror})")
                return None

    def _end(self) -> None:
        say(f"ending the job: SIGTERM, then SIGKILL after {self.opts.grace:g} s")
        result = end_job(self.tree, grace=self.opts.grace)
        self.proc.wait()
        line = f"ended {len(result.terminated)} process(es) with SIGTERM"
        if result.killed:
            line += f", {len(result.killed)} with SIGKILL ({', '.join(map(str, result.killed))})"
        say(line)
        if result.survivors:
            say(f"WARNING: could not end: {', '.join(map(str, result.survivors))}")
