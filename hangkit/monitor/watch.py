"""`hangkit watch`: run a command, pass its output through, and on a hang capture, report, end.

The loop is a single select() over the job's two output pipes and a pidfd for its first
process, so the watcher costs next to nothing while the job runs. Beside it, a Monitor thread
receives the progress beats of ranks that call hangkit.progress(); the loop wakes every TICK
seconds to run stall detection over them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hangkit.envsetup import hang_safe_environment
from hangkit.errors import UsageError, check_positive_seconds, check_seconds_or_zero
from hangkit.files import default_report_dir
from hangkit.flight_recorder.environment import NCCL_PIPE_VARIABLE, recorder_environment
from hangkit.inject import inject_environment, remove_hook
from hangkit.monitor.foundjob import REPORTS_VARIABLE, SNAPSHOT_PREFIX
from hangkit.monitor.guardian import orphan_proof
from hangkit.monitor.guardian import start as start_guardian
from hangkit.monitor.jobtree import MARKER_VARIABLE, JobTree, become_subreaper
from hangkit.monitor.nccl_pipe import remove_pipes
from hangkit.monitor.output import OutputTail, write_all
from hangkit.monitor.server import Monitor
from hangkit.monitor.stall import AUTO, AUTO_FLOOR, HANG_KINDS, StallConfig
from hangkit.monitor.terminate import end_job, end_nodes
from hangkit.procfs import new_shared_memory, remove_unheld_shared_memory, shared_memory_names
from hangkit.records import StallEvent

if TYPE_CHECKING:  # imported when first needed: a job that never hangs does not pay for it
    from hangkit.monitor.confirm import Confirmation

HANG_EXIT = 124
# Larger pipes let a job write bursts without waiting for the watcher to be scheduled.
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031
# After the first process exits, output still in the pipes is read for at most this long.
DRAIN_SECONDS = 2.0
# How often stall detection runs over the ranks' progress (and, without a pidfd on kernels
# before 5.3, how often the first process is polled).
TICK = 0.25
MAX_SILENCE_FACTOR = 10


@dataclass
class WatchOptions:
    command: list[str]
    timeout: float
    grace: float = 30.0
    report_dir: Path | None = None
    setup_env: bool = True
    # None: progress is reported, never a hang by itself; "auto": derived from the step times.
    progress_timeout: float | str | None = None
    bind: str = "127.0.0.1"  # where the monitor listens for the ranks' agents
    # Until the job's first output or a rank's first beat, silence is judged against this:
    # torch and NCCL initialisation on hundreds of nodes takes minutes.
    startup_timeout: float = 1800.0
    # Silence that ends even a job whose ranks keep progressing (default: MAX_SILENCE_FACTOR
    # times the timeout, and never less than the start-up timeout while it applies).
    max_silence: float | None = None
    flight_recorder: bool = True  # turn torch's Flight Recorder on, unless the user set it
    inject: bool = True  # an agent in every rank, with no change to its code (hangkit/inject.py)

    @property
    def ceiling(self) -> float:
        return self.max_silence if self.max_silence is not None \
            else MAX_SILENCE_FACTOR * self.timeout


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
    if opts.progress_timeout not in (None, AUTO):
        check_positive_seconds("progress_timeout", opts.progress_timeout)
    check_positive_seconds("startup_timeout", opts.startup_timeout)
    if opts.max_silence is not None:
        check_positive_seconds("max_silence", opts.max_silence)
    executable = resolve_command(opts.command)
    env = dict(os.environ)
    tmpdir = None
    if opts.setup_env:
        env, changes, tmpdir = hang_safe_environment(env)
        for change in changes:
            say(f"set {change}")
    env, changes = recorder_environment(env, on=opts.flight_recorder)
    for change in changes:
        say(f"set {change}")
    # The NCCL watchdogs' pipes are made under a name watch gave (not one the user gave):
    # watch removes those of its node once the job is over.
    pipes = env.get(NCCL_PIPE_VARIABLE) if NCCL_PIPE_VARIABLE not in os.environ else None
    env, hook = inject_environment(env, on=opts.inject, watcher=os.getpid())
    marker = uuid.uuid4().hex
    env[MARKER_VARIABLE] = marker
    # Named now, so that `hangkit attach` finds where snapshots go from any process of the job.
    opts = dataclasses.replace(opts, report_dir=Path(
        opts.report_dir or default_report_dir()).absolute())
    env[REPORTS_VARIABLE] = str(opts.report_dir)
    auto = opts.progress_timeout == AUTO
    stall_after = AUTO_FLOOR if auto else opts.progress_timeout or opts.timeout
    # A desync must be established before the stall it causes is reported as a hang.
    monitor = Monitor(bind=opts.bind, config=StallConfig(
        stall_after=stall_after, desync_after=min(2.0, stall_after / 2), auto=auto))
    env.update(monitor.environment())
    # From here on (the finally below tells it goodbye), should watch die without cleaning up
    # (SIGKILL, the OOM killer), its guardian ends the job and removes these (guardian.py).
    guardian = start_guardian(marker=marker, grace=opts.grace, directories=[tmpdir, hook],
                              pipes=pipes)
    helpers = frozenset([guardian.pid] if guardian is not None else [])
    become_subreaper()
    previous = {s: signal.signal(s, _raise_interrupted) for s in _ending_signals()}
    # Before the job starts: SIGUSR1's default action would end watch.
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _ask_snapshot)
    proc = None
    shm_before = shared_memory_names()  # the job's segments are those made after this
    try:
        try:
            # Through orphan_proof: the job's first process gets SIGTERM the moment watch dies.
            proc = subprocess.Popen(orphan_proof([executable, *opts.command[1:]], env),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                    bufsize=0)
            if guardian is not None:
                guardian.job_started(proc.pid)
            watcher = _Watcher(opts, proc, JobTree(proc.pid, marker, helpers=helpers), env,
                               monitor, shm_before)
        except _Interrupted as e:  # before the loop could take it: end what was started
            if proc is not None:
                end_job(JobTree(proc.pid, marker, helpers=helpers), grace=opts.grace)
                proc.wait()
            return 128 + e.signum
        return watcher.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        monitor.close()
        remove_hook(hook)
        remove_pipes(pipes)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if guardian is not None:  # last: until now, a SIGKILL leaves the rest to it
            guardian.goodbye()


def _ending_signals() -> list[int]:
    """The signals that end the job cleanly: SIGINT, SIGTERM (PBS at the walltime), and SIGHUP
    (a dropped ssh session), except where SIGHUP was ignored when watch started: nohup's (and
    tmux's, a batch script's) promise that the job outlives the terminal."""
    hangup = [] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else [signal.SIGHUP]
    return [signal.SIGINT, signal.SIGTERM, *hangup]


def _raise_interrupted(signum, _frame):
    raise _Interrupted(signum)


# Set by SIGUSR1, taken by the watch loop within a TICK: a look is no work for a handler.
_SNAPSHOT_ASKED = threading.Event()


def _ask_snapshot(_signum, _frame):
    _SNAPSHOT_ASKED.set()


class _Watcher:
    def __init__(self, opts: WatchOptions, proc: subprocess.Popen, tree: JobTree, env: dict,
                 monitor: Monitor, shm_before: set[str]):
        self.opts, self.proc, self.tree, self.env = opts, proc, tree, env
        self.shm_before = shm_before
        self.monitor = monitor
        self.tail = OutputTail()
        self.started_at = time.time()
        self.last_output = time.monotonic()
        self.started = False  # the job's first output, or a rank's first progress()
        self.next_look = opts.startup_timeout  # seconds of silence at which to look next
        # The looks at the current silence ("output") and at the current progress stall
        # ("progress"), once there are any: output ends the one, not the other.
        self.confirmations: dict[str, Confirmation] = {}
        self.stall: StallEvent | None = None  # a progress stall a look found still moving
        self.progress_look = 0.0  # when to look at that stall again
        self._ending = False  # the job is being ended: a signal now escalates to SIGKILL
        self.snapshots = 0  # taken on SIGUSR1
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
            return self._interrupted(e.signum)
        except Exception as e:  # a bug of watch's own must not leave the job running
            say(f"internal error ({type(e).__name__}: {e}): ending the job")
            self._end()
            raise
        finally:
            self.sel.close()
            if self.pidfd is not None:
                os.close(self.pidfd)
            self.proc.stdout.close()
            self.proc.stderr.close()

    def _loop(self) -> int:
        while True:
            if _SNAPSHOT_ASKED.is_set():
                self._snapshot()
            idle = time.monotonic() - self.last_output
            if idle >= self.next_look:
                code = self._suspect(idle, "output", self._silence_reason(idle))
                if code is not None:
                    return code
                continue
            wait = min(self.next_look - idle, TICK)
            for key, _ in self.sel.select(timeout=wait):
                if key.data == "exit":
                    return self._finished()
                self._pump(key.fd)
            if self.pidfd is None and self.proc.poll() is not None:
                return self._finished()
            if not self.started and self.monitor.progress_reported():  # a rank's first
                self._start_up_over()
            stalled = self._check_progress()
            if stalled is not None:
                code = self._suspect(stalled.since, "progress", (
                    f"{stalled.event.summary} (--progress-timeout "
                    f"{self._progress_timeout()})"))
                if code is not None:
                    return code

    def _progress_timeout(self) -> str:
        if self.opts.progress_timeout == AUTO:
            return f"auto: {self.monitor.detector.stall_after:.0f} s from the step times"
        return f"{self.opts.progress_timeout:g}"

    def _silence_reason(self, idle: float) -> str:
        if not self.started:
            return (f"no output for {idle:.0f} s since the job started (--startup-timeout "
                    f"{self.opts.startup_timeout:g})")
        return f"no output for {idle:.0f} s (--timeout {self.opts.timeout:g})"

    def _start_up_over(self) -> None:
        self.started = True
        self.next_look = min(self.next_look, self.opts.timeout)

    def _suspect(self, idle: float, detector: str, reason: str) -> int | None:
        """A detector fired: looks at every process before calling it a hang. Returns the
        exit code when it is one (or the ceiling is reached), None to keep watching."""
        # Only once something looks wrong.
        from hangkit.monitor.confirm import Confirmation, progressing_phrase

        confirmation = self.confirmations.setdefault(detector, Confirmation())
        ranks = self.monitor.statuses()
        look = confirmation.look(self.monitor, ranks, self.tree.pids(), at=idle)
        self.monitor.note_look(look)  # a progressing rank reads busy, not stalled, meanwhile
        if self._moved_on(detector, confirmation):
            return None
        silent = time.monotonic() - self.last_output
        ceiling = self.opts.ceiling if self.started else max(self.opts.ceiling,
                                                            self.opts.startup_timeout)
        moving = confirmation.progressing
        if moving and silent < ceiling:
            say(f"{'silent' if detector == 'output' else 'no progress beats'} for "
                f"{idle:.0f} s, but {progressing_phrase(moving)}; looking again in "
                f"{self.opts.timeout:g} s")
            self.next_look = silent + self.opts.timeout
            self.progress_look = time.monotonic() + self.monitor.detector.stall_after
            return None
        if moving:
            look.verdict = "ceiling"
            reason = (f"{reason}; ended at --max-silence {ceiling:g} although "
                      f"{progressing_phrase(moving)}")
        return self._hang(silent if detector == "output" else idle, confirmation,
                          detector=detector, reason=reason)

    def _moved_on(self, detector: str, confirmation: Confirmation) -> bool:
        """Whether the job ended, or (for silence) printed, while it was being looked at (a
        look takes a second or two in which the pipes are not read)."""
        before = self.last_output
        for key, _ in self.sel.select(timeout=0):
            if key.data == "exit":
                return True  # the loop passes the exit code on
            self._pump(key.fd)
        if self.proc.poll() is not None or (detector == "output" and self.last_output != before):
            return True
        return confirmation.all_gone  # the job is ending by itself

    def _check_progress(self) -> _ProgressHang | None:
        """Runs stall detection; says each new finding; returns a stall that counts as a hang:
        a new one, or one still there a period after a look found ranks progressing."""
        hang = None
        for event in self.monitor.detect():
            say(f"[{event.kind}] {event.summary}")
            if self.opts.progress_timeout is not None and event.kind in HANG_KINDS:
                hang = self.stall = event
        if hang is None and self.stall is not None and time.monotonic() >= self.progress_look:
            still = [e for e in self.monitor.active_events() if e.kind in HANG_KINDS]
            self.stall = hang = still[0] if still else None
            if hang is None:  # the ranks advanced again: a later stall starts afresh
                self.confirmations.pop("progress", None)
        if hang is None:
            return None
        since = min((r.since_progress for r in self.monitor.statuses() if r.rank in hang.ranks),
                    default=self.monitor.detector.stall_after)
        return _ProgressHang(hang, since)

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
        if not self.started:
            self._start_up_over()
        self.next_look = self.opts.timeout
        self.confirmations.pop("output", None)  # a new silence starts from nothing seen
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
        if code != 0:  # how the ranks ended, as their shims reported it (hangkit rank)
            for event in self.monitor.step():
                if event.kind == "dead":
                    say(f"[{event.kind}] {event.summary}")
        leftovers = self.tree.processes()
        if leftovers:
            result = end_job(self.tree, grace=self.opts.grace)
            ended = result.terminated + result.killed
            if ended:
                say(f"ended {len(ended)} process(es) the command left running: "
                    f"{', '.join(map(str, ended))}")
        if code != 0:
            self._remove_shared_memory()
        return 128 - code if code < 0 else code

    def _remove_shared_memory(self) -> None:
        """The /dev/shm segments the job made and nobody holds any more: a rank that was
        killed, or aborted, never reaches the MPI_Finalize that removes MPICH's."""
        removed = remove_unheld_shared_memory(new_shared_memory(self.shm_before))
        if removed:
            say(f"removed the shared memory the job left: {', '.join(removed)}")

    def _hang(self, idle: float, confirmation: Confirmation, *, detector: str,
              reason: str) -> int:
        """Reports the hang the last look confirmed, from that look's capture, and ends the
        job."""
        # Imported here: a job that never hangs should not pay for them at start-up.
        from hangkit.monitor.jobcontext import job_context
        from hangkit.monitor.report import build_report, render_summary

        look = confirmation.looks[-1]
        say(f"{reason}: confirmed by {len(confirmation.looks)} look(s) at every process "
            f"of the job ({look.seconds:.1f} s)")
        context = {**job_context(self.env), "monitor": self.monitor.stats()}
        report = build_report(
            reason=reason, command=self.opts.command, idle_seconds=idle,
            processes=confirmation.snapshots, last_lines=self.tail.lines(),
            context=context, started_at=self.started_at, capture_seconds=look.capture_seconds,
            detector=detector, ranks=self.monitor.statuses(),
            events=self.monitor.active_events(), looks=confirmation.looks,
            nodes=confirmation.nodes)
        paths = self._write(report)
        for line in render_summary(report):
            write_all(2, (line + "\n").encode())
        self._end()
        if paths:
            say(f"report: {paths[1]} (and {paths[0].name} beside it)")
        return HANG_EXIT

    def _snapshot(self) -> None:
        """SIGUSR1 (`kill -USR1`, or `hangkit attach WATCH_PID`): a report of the job now,
        from a look at every process, written beside the reports as snapshot-N; the job goes
        on, and so does the watch (a look's seconds do not count as the job's silence)."""
        from hangkit.files import private_directory
        from hangkit.monitor.confirm import Confirmation, progressing_phrase
        from hangkit.monitor.jobcontext import job_context
        from hangkit.monitor.report import build_report, write_report

        _SNAPSHOT_ASKED.clear()
        self.snapshots += 1
        idle = time.monotonic() - self.last_output
        looking = time.monotonic()
        confirmation = Confirmation()
        look = confirmation.look(self.monitor, self.monitor.statuses(), self.tree.pids(),
                                 at=idle)
        moving = confirmation.progressing
        reason = (f"snapshot asked for (SIGUSR1), {idle:.0f} s after the job's last output: "
                  + (progressing_phrase(moving) if moving else "no rank or worker progressing"))
        report = build_report(
            reason=reason, command=self.opts.command, idle_seconds=idle,
            processes=confirmation.snapshots, last_lines=self.tail.lines(),
            context={**job_context(self.env), "monitor": self.monitor.stats()},
            started_at=self.started_at, capture_seconds=look.capture_seconds,
            detector="snapshot", ranks=self.monitor.statuses(),
            events=self.monitor.active_events(), looks=confirmation.looks,
            nodes=confirmation.nodes)
        report.hang = False  # watch's timeouts judge hangs; a snapshot says where things are
        directory = self.opts.report_dir / f"{SNAPSHOT_PREFIX}{self.snapshots}"
        try:
            private_directory(self.opts.report_dir)  # the reports' own, before snapshot-N
            paths = write_report(report, directory)
            say(f"snapshot: {paths[1]} (the job goes on)")
        except OSError as e:
            say(f"cannot write the snapshot to {directory}: {e.strerror or e}")
        self.last_output += time.monotonic() - looking

    def _write(self, report):
        from hangkit.files import NotYourDirectory
        from hangkit.monitor.report import write_report

        directory = Path(self.opts.report_dir)  # named at start: see watch()
        try:
            return write_report(report, directory)
        except NotYourDirectory as e:
            # A link planted at the name, another user's directory, one others can write:
            # never written through. A fresh one (mkdtemp: made exclusively, 0700) beside it.
            why, places = f"not using {e}", [directory.parent, Path("."), None]
        except OSError as e:
            why, places = f"cannot write the report to {directory} ({e.strerror or e})", [None]
        for place in places:
            try:
                fallback = Path(tempfile.mkdtemp(prefix="hangkit-report-", dir=place)).absolute()
            except OSError:
                continue
            say(f"{why}; writing it to {fallback} instead")
            try:
                return write_report(report, fallback)
            except OSError as e2:
                say(f"cannot write the report to {fallback} either ({e2.strerror or e2})")
                return None
        say(f"{why}; no directory could be made for it")
        return None

    def _interrupted(self, signum: int) -> int:
        """SIGINT, SIGTERM, SIGHUP: the job is ended as watch ends it (a hang already confirmed
        has its report written). A signal while it is being ended (a report's end, or a first
        signal's, during the grace) ends what is left with SIGKILL at once, and so does any
        after it: the exit code is the first signal's."""
        grace = 0.0 if self._ending else None
        say(f"received {signal.Signals(signum).name}: " + (
            "SIGKILL to what is left of the job" if grace == 0.0 else "ending the job"))
        while True:
            try:
                self._end(grace)
                return 128 + signum
            except _Interrupted:
                grace = 0.0

    def _end(self, grace: float | None = None) -> None:
        self._ending = True  # a signal from here on: _interrupted
        grace = self.opts.grace if grace is None else grace
        say(f"ending the job: SIGTERM, then SIGKILL after {grace:g} s")
        others = end_nodes(self.monitor, grace=grace)  # in the background
        result = end_job(self.tree, grace=grace)
        self.proc.wait()
        for line in others():
            say(line)
        line = f"ended {len(result.terminated)} process(es) with SIGTERM"
        if result.killed:
            line += f", {len(result.killed)} with SIGKILL ({', '.join(map(str, result.killed))})"
        say(line)
        if result.removed:
            say(f"removed the shared memory the ended processes left: {', '.join(result.removed)}")
        self._remove_shared_memory()  # and what ranks that died before left
        if result.survivors:
            say(f"WARNING: could not end: {', '.join(map(str, result.survivors))}")
