"""Small readers of /proc: environment, kernel state, and the syscall a blocked thread sits in.

Used wherever another process is looked at: the monitor's capture, a rank's own tracker
cleanup (wandb's service processes), the doctor's probe children, and the tests.

Every reader returns None when the process is gone or unreadable: a process that exits while we
look at it is a normal event during a hang capture, never an error.
"""

from __future__ import annotations

import contextlib
import os
import platform
import stat
from collections.abc import Iterable

from hangkit import deadline
from hangkit.records import Syscall

STAT_SECONDS = 0.5  # for the stat that tells a FIFO from a file

# The syscalls a hung process is usually found in. Numbers differ per architecture.
_SYSCALLS = {
    "x86_64": {
        0: "read", 1: "write", 2: "open", 7: "poll", 17: "pread64", 19: "readv", 23: "select",
        35: "nanosleep", 42: "connect", 43: "accept", 45: "recvfrom", 47: "recvmsg", 61: "wait4",
        202: "futex", 230: "clock_nanosleep", 232: "epoll_wait", 257: "openat", 270: "pselect6",
        271: "ppoll", 281: "epoll_pwait", 288: "accept4", 295: "preadv", 441: "epoll_pwait2",
        24: "sched_yield", 4: "stat", 5: "fstat", 6: "lstat", 262: "newfstatat", 332: "statx",
        74: "fsync", 75: "fdatasync", 217: "getdents64",
    },
    "aarch64": {
        63: "read", 64: "write", 56: "openat", 73: "ppoll", 67: "pread64", 65: "readv",
        72: "pselect6", 101: "nanosleep", 203: "connect", 202: "accept", 207: "recvfrom",
        212: "recvmsg", 260: "wait4", 98: "futex", 115: "clock_nanosleep", 22: "epoll_pwait",
        242: "accept4", 69: "preadv", 441: "epoll_pwait2", 124: "sched_yield", 79: "newfstatat",
        291: "statx", 82: "fsync", 83: "fdatasync", 61: "getdents64",
    },
}
_FD_SYSCALLS = {"read", "pread64", "readv", "preadv", "recvfrom", "recvmsg", "accept", "accept4",
                "connect", "write", "fsync", "fdatasync", "getdents64", "fstat"}
_PATH_ARG = {"openat": 1, "open": 0, "stat": 0, "lstat": 0, "newfstatat": 1, "statx": 1}


def read_environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def runs_python(pid: int, cmdline: list[str] | None = None) -> bool:
    """Whether the process runs Python (py-spy has something to read): its command or its
    executable is python*, or it maps libpython (an embedding program). mpiexec or a shell
    does not."""
    names = [cmdline[0]] if cmdline else []
    with contextlib.suppress(OSError):
        names.append(os.readlink(f"/proc/{pid}/exe"))
    if any(os.path.basename(n).startswith("python") for n in names):
        return True
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("libpython" in line for line in f)
    except OSError:
        return False


def kernel_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat: R running, S sleeping, D uninterruptible, ..."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    return text[text.rfind(")") + 2:][:1] or None


def pid_alive(pid: int) -> bool:
    """Running and not a zombie (an exited child its parent has not reaped yet). Only the
    kernel's word that the process is gone reads as gone: a /proc file that cannot be opened
    for another reason (out of descriptors under a flood of connections, EMFILE) asks
    kill(pid, 0), which needs none, and otherwise reads as alive (issue 24: it read as death)."""
    if not isinstance(pid, int) or pid <= 0:  # kill(0) would be our own process group
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # EPERM: another user's, and there
            pass
        return True
    return text[text.rfind(")") + 2:][:1] not in ("", "Z", "X")


def blocked_syscall(pid: int, tid: int | None = None) -> Syscall | None:
    """The syscall thread `tid` (default: the main thread) is blocked in, with what it waits on."""
    tid = tid or pid
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or not fields[0].lstrip("-").isdigit() or int(fields[0]) < 0:
        return None  # "running", or not in a syscall
    number = int(fields[0])
    args = [int(a, 16) for a in fields[1:7]]
    name = _SYSCALLS.get(platform.machine(), {}).get(number, f"syscall {number}")
    target = kind = None
    if name in _FD_SYSCALLS and args:
        target = _fd_target(pid, args[0])
        if target is not None:
            kind = _kind(target, f"/proc/{pid}/fd/{args[0]}")
    elif name in _PATH_ARG and len(args) > _PATH_ARG[name]:
        target = _read_c_string(pid, args[_PATH_ARG[name]])
        if target is not None:
            kind = _kind(target, os.path.join(f"/proc/{pid}/cwd", target))
    return Syscall(name=name, number=number, target=target, target_kind=kind)


def _kind(target: str, path: str) -> str:
    """What a syscall waits on: "pipe" and "socket" are in the fd's link; a path is stat()ed to
    tell a named pipe (FIFO: it blocks like a hung filesystem, but is none) from a file. stat on a
    hung filesystem can block too, hence the deadline: then it is a file, and a stalled one."""
    for kind in ("pipe", "socket"):
        if target.startswith(f"{kind}:"):
            return kind
    if not target.startswith("/"):
        return "other"
    try:
        mode = deadline.call(lambda: os.stat(path).st_mode, timeout=STAT_SECONDS,
                             name=f"stat {target}")
    except (OSError, deadline.DeadlineExceeded):
        return "file"
    return "fifo" if stat.S_ISFIFO(mode) else "file"


def _fd_target(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _read_c_string(pid: int, address: int, limit: int = 4096) -> str | None:
    """Reads a NUL-terminated string from the process's memory (needs ptrace rights, as py-spy)."""
    if not address:
        return None
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(address)
            raw = mem.read(limit)
    except (OSError, OverflowError, ValueError):
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace") or None


SHARED_MEMORY = "/dev/shm/"


def shared_memory_files(pids: Iterable[int]) -> set[str]:
    """The named files under /dev/shm that these processes have mapped or open (not those
    they already unlinked): MPICH's, NCCL's and torch's segments. A process that is gone or
    unreadable holds none."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps", encoding="utf-8",
                                                errors="replace") as maps:
            for line in maps:
                at = line.find(SHARED_MEMORY)
                if at >= 0 and not line.rstrip().endswith("(deleted)"):
                    found.add(line[at:].rstrip("\n"))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(SHARED_MEMORY) and not target.endswith(" (deleted)"):
                        found.add(target)
    return found


def shared_memory_names() -> set[str]:
    """The names in /dev/shm now: what new_shared_memory compares with."""
    try:
        return set(os.listdir(SHARED_MEMORY))
    except OSError:
        return set()


def new_shared_memory(before: set[str]) -> set[str]:
    """This user's plain files in /dev/shm that were not there `before` (a job's segments,
    whose holders may all be dead already); remove_unheld_shared_memory keeps those that some
    process still holds."""
    found = set()
    uid = os.getuid()
    for name in shared_memory_names() - before:
        path = os.path.join(SHARED_MEMORY, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if info.st_uid == uid and info.st_nlink == 1 and stat.S_ISREG(info.st_mode):
            found.add(path)
    return found


def remove_unheld_shared_memory(paths: set[str]) -> list[str]:
    """Removes those of these /dev/shm files that no process of this machine (this PID
    namespace) holds any more; returns them. For the segments of processes that were killed:
    MPICH removes its segment in MPI_Finalize, which a killed rank never reaches, and /dev/shm
    is memory, so a node that ends hung jobs one after another fills it (and DataLoaders then
    die of a bus error, DL-03)."""
    if not paths:
        return []
    held = shared_memory_files(int(name) for name in os.listdir("/proc") if name.isdigit())
    removed = []
    for path in sorted(paths - held):
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed
