"""A rank's NCCL Flight Recorder, asked of torch itself when the rank's agent cannot answer.

ProcessGroupNCCL's watchdog reads a named pipe, `$TORCH_NCCL_DEBUG_INFO_PIPE_FILE` + rank +
`.pipe`, which it makes itself (only where the variable is set and the recorder is on), about
once a second; a byte written there makes it dump its recorder to `$TORCH_FR_DUMP_TEMP_FILE` +
rank (`/tmp/nccl_trace_rank_` + rank by default). The watchdog is a C++ thread: it answers
while the main thread holds the GIL or is wedged in a CUDA call, when the agent cannot. gloo
has no such pipe: for its ranks nothing here finds one, and nothing waits.

`hangkit watch` sets the variable for the jobs it runs (flight_recorder/environment.py), to a
name of its own under /tmp, which exists on every node (a directory that does not exist would
make torch's watchdog fail), and removes the pipes on its node when the job is over; a
`hangkit rank` removes its rank's.

Runs where the rank runs: in the capture on watch's node, and in each shim's capture on its.
"""

from __future__ import annotations

import glob
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from hangkit.errors import UsageError
from hangkit.flight_recorder.dumps import read_dump
from hangkit.flight_recorder.environment import NCCL_PIPE_VARIABLE, dump_prefixes
from hangkit.records import Recording

WAIT = 5.0  # the watchdog looks at its pipe about once a second; a dump takes milliseconds
POLL = 0.1
SOURCE = "torch's NCCL watchdog (TORCH_NCCL_DEBUG_INFO_PIPE_FILE)"


@dataclass
class Asked:
    rank: int
    dump_paths: list[Path]  # where torch may write it (its version decides): the first found
    asked_at: float  # wall time: the dump must be newer


def pipe_path(env: dict[str, str], rank: int) -> str | None:
    stem = env.get(NCCL_PIPE_VARIABLE)
    return f"{stem}{rank}.pipe" if stem else None


def ask(env: dict[str, str] | None, rank: int | None) -> Asked | None:
    """Writes to the rank's pipe, if torch made one: None where there is none (gloo, no
    recorder), it is not ours, or no watchdog reads it."""
    path = pipe_path(env or {}, rank) if rank is not None else None
    if path is None:
        return None
    try:
        info = os.lstat(path)
        if not stat.S_ISFIFO(info.st_mode) or info.st_uid != os.getuid():
            return None
        # Non-blocking: with no reader (the rank is gone) this fails at once with ENXIO.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        os.write(fd, b"1")
    except OSError:
        return None
    finally:
        os.close(fd)
    return Asked(rank, [Path(p + str(rank)) for p in dump_prefixes(env or {})], time.time())


def collect(asked: list[Asked], *, timeout: float = WAIT) -> dict[int, Recording]:
    """The dumps the watchdogs wrote, each once it is newer than the request and reads whole,
    until the deadline; a rank whose dump did not come says why."""
    deadline = time.monotonic() + timeout
    found: dict[int, Recording] = {}
    waiting = {a.rank: a for a in asked}
    while waiting:
        for rank, a in list(waiting.items()):
            dump = _fresh_dump(a)
            if dump is not None:
                found[rank] = Recording(rank=rank, dump=dump, source=SOURCE)
                del waiting[rank]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    for rank, a in waiting.items():
        found[rank] = Recording(rank=rank, source=SOURCE, error=(
            f"its NCCL watchdog wrote no dump to {' or '.join(map(str, a.dump_paths))} "
            f"within {timeout:g} s"))
    return found


def _fresh_dump(a: Asked) -> dict | None:
    for path in a.dump_paths:
        try:
            info = os.lstat(path)
        except OSError:
            continue
        # Another user's file, or one from before the request, is not this rank's answer.
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or \
                info.st_mtime < a.asked_at - 1.0:
            continue
        try:
            return read_dump(path)
        except UsageError:  # still being written
            continue
    return None


def remove_pipes(stem: str | None, rank: int | None = None) -> None:
    """The pipes torch made under a stem hangkit set (one rank's, or all on this node): the
    watchdog never removes its pipe, and a killed rank cannot."""
    if not stem:
        return
    pattern = f"{glob.escape(stem)}{rank if rank is not None else '*'}.pipe"
    for path in glob.glob(pattern):
        try:
            if os.lstat(path).st_uid == os.getuid():
                os.unlink(path)
        except OSError:
            continue
