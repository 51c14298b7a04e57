"""What ends a watched job, and removes what watch made for it, when watch dies without doing so.

watch ends its job and removes its files itself: at the job's end, on a hang, and on SIGTERM,
SIGINT and SIGHUP. SIGKILL (the OOM killer, `kill -9`) lets it do neither: the ranks went on
spinning under PID 1, burning the allocation, and its TMPDIR, hook directory and MPICH's
/dev/shm segment stayed. Two nets, both set up before the job starts:

- The parent-death signal. The job's first process (mpiexec, torchrun, python) is started
  through `exec` below: a bare interpreter that sets PR_SET_PDEATHSIG (SIGTERM) on itself and
  execs the command, keeping its pid, parent, environment and signal dispositions. When watch
  dies the kernel sends it SIGTERM at once, and a launcher ends its ranks (hydra's mpiexec does;
  its proxies end the ranks of an mpiexec that was killed outright, too).
- The guardian (`guard` below): a small process watch starts first, in a session of its own (a
  hung-up terminal's SIGHUP and a Ctrl-C do not reach it), reading a pipe only watch writes to.
  watch writes what the guardian would need (the job's marker, its directories) before the
  guardian exists, the job's first pid once it is started, and a goodbye once it has cleaned up.
  End of file with no goodbye means watch died: the guardian then does what watch would have
  (terminate.end_job over the job's JobTree, SIGTERM, the grace, SIGKILL), removes the job's
  TMPDIR, hook directory and NCCL pipes, and the /dev/shm files made while the job ran that no
  process holds any more (the launcher, woken by its death signal, may have killed the ranks
  before the guardian could see what they held). Then it exits.

Both run as `python -I -S guardian.py`: no site, no sitecustomize, none of hangkit imported
(measured here: the wrapper adds about 15 ms to the job's start; a waiting guardian took about
10 ms of CPU to start and holds about 11 MB; it imports hangkit only once watch is gone).
Neither kills anything while watch lives: the guardian acts only on the end of its pipe, which
the kernel closes only when watch has exited.
"""

from __future__ import annotations

import contextlib
import os
import sys

PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = 15  # SIGTERM: launchers end their ranks on it; the guardian escalates
# The guardian also looks every this many seconds whether watch is still its parent: the
# pipe's end is the signal, this only a second net should the pipe's write end leak.
CHECK_SECONDS = 10.0
GOODBYE_SECONDS = 5.0  # for the guardian to leave once watch said goodbye
END_MARGIN = 30.0  # past the grace, for end_job's SIGKILL rounds
REMOVE_SECONDS = 10.0  # for each directory's removal
SHARED_MEMORY = "/dev/shm"


# -- watch's side --------------------------------------------------------------------------------

class Guardian:
    """watch's handle on its guardian: the pipe's write end, and the process."""

    def __init__(self, proc, fd: int):
        self.proc, self.pid, self._fd = proc, proc.pid, fd

    def job_started(self, pid: int) -> None:
        """The job's first process, and its start time (so a pid reused later is not taken)."""
        self._send({"root": pid, "start": start_time(pid)})

    def goodbye(self, timeout: float = GOODBYE_SECONDS) -> None:
        """watch has ended its job and removed its files: the guardian leaves (and is waited
        for, so nothing of watch's outlives it)."""
        import subprocess

        self._send({"bye": True})
        _close(self._fd)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def _send(self, message: dict) -> None:
        import json

        _write_all(self._fd, (json.dumps(message) + "\n").encode())


def start(*, marker: str, grace: float, directories: list[str | None],
          pipes: str | None) -> Guardian | None:
    """Starts watch's guardian; None where it cannot be started (watch runs on without)."""
    import json
    import subprocess

    read_end, write_end = os.pipe()  # neither inherited by anything watch starts
    # Written before the guardian exists: there is no moment at which watch could die with
    # the guardian not knowing what to clean up. (Far below the pipe's 64 KiB.)
    config = {"watcher": os.getpid(), "marker": marker, "grace": grace,
              "directories": [d for d in directories if d], "pipes": pipes,
              "path": [p for p in sys.path if p]}
    _write_all(write_end, (json.dumps({"config": config}) + "\n").encode())
    try:
        # A session of its own: a terminal's hang-up and Ctrl-C reach watch and its job, not
        # the guardian. stdout is not held open (a pipe reading watch's output ends with watch);
        # stderr is watch's, to say what it did.
        proc = subprocess.Popen([sys.executable, "-I", "-S", __file__, "guard", str(read_end)],
                                pass_fds=(read_end,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        _close(write_end)
        return None
    finally:
        _close(read_end)
    return Guardian(proc, write_end)


def orphan_proof(argv: list[str], env: dict[str, str]) -> list[str]:
    """The command line that runs argv (its program's path first) with watch's death signal.

    Not subprocess's preexec_fn: it runs Python between fork and exec in a child of a process
    that already has threads (the Monitor's, ZeroMQ's), which CPython documents as unsafe (a
    lock another thread held at the fork deadlocks the child, and watch with it, in Popen).
    A wrapper costs one bare interpreter start (about 15 ms) and leaves the job as it was: same
    pid and parent (watch still waits for it, through its pidfd), same environment (Python's
    locale coercion of LC_CTYPE is undone: its value is passed here), same signal dispositions
    (Python's ignored SIGPIPE and SIGXFSZ are restored to their default, as Popen does).
    """
    lc_ctype = env.get("LC_CTYPE")
    return [sys.executable, "-I", "-S", __file__, "exec", str(os.getpid()),
            "-" if lc_ctype is None else f"={lc_ctype}", *argv]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


# -- the job's first process, before its exec ------------------------------------------------------

def _exec(watcher: int, lc_ctype: str, argv: list[str]) -> int:
    import ctypes
    import signal

    # Kept across exec (cleared only for a setuid or setgid program, or one with file
    # capabilities: none of the launchers is one). Sent when the thread that forked us exits:
    # watch's main thread, which lives as long as watch.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, DEATH_SIGNAL, 0, 0, 0) != 0:
        _say(f"cannot set the parent-death signal ({os.strerror(ctypes.get_errno())}): the "
             "job is not ended should watch be killed; its guardian still ends it")
    if os.getppid() != watcher:  # watch died before the signal was set: nobody would get it
        return 128 + DEATH_SIGNAL
    for s in (signal.SIGPIPE, signal.SIGXFSZ):  # what Python ignores for itself
        signal.signal(s, signal.SIG_DFL)
    if lc_ctype == "-":
        os.environ.pop("LC_CTYPE", None)
    else:
        os.environ["LC_CTYPE"] = lc_ctype[1:]
    try:
        os.execv(argv[0], argv)
    except OSError as e:
        _say(f"cannot run {argv[0]}: {e.strerror}")
        return 127
    return 127  # not reached


# -- the guardian --------------------------------------------------------------------------------

def guard(fd: int) -> int:
    """Waits for watch's goodbye; takes over if the pipe ends without one."""
    import json
    import select
    import signal

    for s in (signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    shm_before = _listing(SHARED_MEMORY)  # before the job could have made anything there
    config, root, pending = None, None, b""
    while True:
        ready, _, _ = select.select([fd], [], [], CHECK_SECONDS)
        if not ready:
            if config is not None and os.getppid() != config["watcher"]:
                break  # re-parented: watch is gone, though the pipe did not say so
            continue
        data = os.read(fd, 65536)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("bye"):
                return 0
            config = message.get("config", config)
            if "root" in message:
                root = (message["root"], message.get("start"))
    if config is None:
        return 0
    try:
        take_over(config, root, shm_before)
    except Exception as e:  # hangkit not importable any more, a bug: say so, in one line
        _say(f"watch's guardian could not end the job ({type(e).__name__}: {e})")
        return 1
    return 0


def take_over(config: dict, root: tuple[int, int | None] | None, shm_before: set[str]) -> None:
    """Does what watch would have done at the end: ends the job, removes its files."""
    # hangkit is imported only now. Its directory first (an editable install finds it through
    # an import hook, which -S does not run), then watch's path, for psutil.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path[:0] = [p for p in [package_root, *config["path"]] if p not in sys.path]
    import shutil

    from hangkit import deadline
    from hangkit.monitor.jobtree import JobTree
    from hangkit.monitor.nccl_pipe import remove_pipes
    from hangkit.monitor.terminate import end_job
    from hangkit.procfs import new_shared_memory, remove_unheld_shared_memory

    watcher, grace = config["watcher"], float(config["grace"])
    _say(f"watch (pid {watcher}) is gone without ending its job: its guardian (pid "
         f"{os.getpid()}) ends it: SIGTERM, then SIGKILL after {grace:g} s")
    pid = root[0] if root is not None and start_time(root[0]) == root[1] else None
    try:
        result = deadline.call(lambda: end_job(JobTree(pid, config["marker"]), grace=grace),
                               timeout=grace + END_MARGIN, name="ending the job")
        line = (f"ended {len(result.terminated)} process(es) with SIGTERM, "
                f"{len(result.killed)} with SIGKILL" if result.terminated or result.killed else
                "nothing left to end (the job's first process had its death signal)")
        if result.survivors:
            line += f"; could not end: {', '.join(map(str, result.survivors))}"
        _say(line)
        shared = set(result.removed)
    except Exception as e:  # a deadline, a bug: the files below still go
        _say(f"could not end the job ({type(e).__name__}: {e})")
        shared = set()
    removed = []
    for directory in config["directories"]:
        try:
            deadline.call(lambda d=directory: shutil.rmtree(d, ignore_errors=True),
                          timeout=REMOVE_SECONDS,
                          name=f"removing {directory}")
        except deadline.DeadlineExceeded:
            continue
        if not os.path.exists(directory):
            removed.append(directory)
    remove_pipes(config.get("pipes"))
    shared.update(remove_unheld_shared_memory(new_shared_memory(shm_before)))
    removed += sorted(shared)
    if removed:
        _say(f"removed {', '.join(removed)}")


def _listing(directory: str) -> set[str]:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def _say(line: str) -> None:
    _write_all(2, f"hangkit: {line}\n".encode())


def _write_all(fd: int, data: bytes) -> bool:
    """Like output.write_all, without importing hangkit: False once the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:  # EPIPE, EIO (a hung-up terminal), EBADF
            return False
    return True


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def main(argv: list[str]) -> int:
    if argv[:1] == ["exec"] and len(argv) >= 4:
        return _exec(int(argv[1]), argv[2], argv[3:])
    if argv[:1] == ["guard"] and len(argv) == 2:
        return guard(int(argv[1]))
    _say("usage: guardian.py exec WATCHER_PID -|=LC_CTYPE PROGRAM [ARGS...] | guard FD")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
