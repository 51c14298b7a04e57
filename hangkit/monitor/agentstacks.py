"""Stacks of ranks that run an agent: asked of the sidecar, else dumped by faulthandler.

The sidecar answers whenever the rank's main thread has released the GIL, which is the case in
nearly every hang (MPI, gloo, queue and socket waits). It is the only way to see a rank on
another node. A local rank that does not answer in time gets the faulthandler signal: its
handler writes every thread's traceback from C, GIL or not. Whatever is still missing is left to
py-spy by the caller.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hangkit.monitor.collector import key_of
from hangkit.records import Frame, ThreadStack

_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+|\?\?\?) in (.*)$')
# A dump is complete once the file has stopped growing for this long.
SETTLE_SECONDS = 0.05


@dataclass
class AgentStacks:
    key: str
    pid: int
    rank: int | None
    host: str
    threads: list[ThreadStack]
    source: str  # "agent" or "faulthandler"


def gather(monitor, keys: list[str], *, timeout: float = 1.0) -> dict[str, AgentStacks]:
    answered = monitor.request_stacks(keys, timeout=timeout)
    with monitor.lock:
        tracks = {k: monitor.collector.tracks[k] for k in keys if k in monitor.collector.tracks}
    out = {}
    for key, threads in answered.items():
        if key in tracks:
            b = tracks[key].beat
            out[key] = AgentStacks(key, b.pid, b.rank, b.host, threads, "agent")
    silent = [t.beat for k, t in tracks.items() if k not in out and t.beat.host == monitor.host
              and t.beat.dump_file and t.beat.dump_signal]
    if silent:  # all at once: many ranks holding the GIL cost one timeout, not one each
        with ThreadPoolExecutor(max_workers=min(len(silent), 32)) as pool:
            dumps = pool.map(lambda b: faulthandler_dump(
                b.pid, b.dump_file, b.dump_signal, b.main_ident, timeout=timeout), silent)
            for b, threads in zip(silent, dumps):
                if threads:
                    key = key_of(b)
                    out[key] = AgentStacks(key, b.pid, b.rank, b.host, threads, "faulthandler")
    return out


def faulthandler_dump(pid: int, path: str, signum: int, main_ident: int | None, *,
                      timeout: float) -> list[ThreadStack]:
    try:
        offset = os.path.getsize(path)
        os.kill(pid, signum)
    except OSError:
        return []
    deadline = time.monotonic() + timeout
    size, changed = offset, time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            now_size = os.path.getsize(path)
            if now_size != size:
                size, changed = now_size, time.monotonic()
        if size > offset and time.monotonic() - changed >= SETTLE_SECONDS:
            break
        time.sleep(0.01)  # the handler writes within microseconds; this bounds the wait
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read(size - offset).decode(errors="replace")
    except OSError:
        return []
    return parse_faulthandler(text, main_ident)


def parse_faulthandler(text: str, main_ident: int | None) -> list[ThreadStack]:
    """faulthandler's text (innermost frame first) as records (outermost first)."""
    threads: list[ThreadStack] = []
    frames: list[Frame] = []
    for line in text.splitlines():
        head = _THREAD.match(line)
        if head:
            frames = []
            ident = int(head.group(2), 16)
            threads.append(ThreadStack(id=ident, name=None, frames=frames,
                                       is_main=ident == main_ident))
            continue
        frame = _FRAME.match(line)
        if frame and threads:
            line_no = frame.group(2)
            frames.insert(0, Frame(function=frame.group(3), file=frame.group(1),
                                   line=int(line_no) if line_no.isdigit() else None))
    threads.sort(key=lambda t: not t.is_main)
    return threads
