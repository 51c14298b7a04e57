"""This process's stacks, read from inside it: by the sidecar thread, or by faulthandler.

The sidecar reads every thread's frames with sys._current_frames(), which works whenever the
main thread has released the GIL (MPI, gloo, queue and socket waits all do). A main thread that
keeps the GIL in C code starves the sidecar; for that case faulthandler is registered on a
signal: its handler writes all threads' tracebacks from C, without the GIL, to a file the
monitor reads.
"""

from __future__ import annotations

import contextlib
import faulthandler
import linecache
import os
import signal
import sys
import tempfile
import threading

from hangkit.records import Frame, ThreadStack

DUMP_SIGNAL = signal.SIGUSR2


def current_stacks() -> list[ThreadStack]:
    threads = {t.ident: t for t in threading.enumerate()}
    main_ident = threading.main_thread().ident
    stacks = []
    for ident, top in sys._current_frames().items():
        frames = []
        frame = top
        while frame is not None:
            code = frame.f_code
            frames.append(Frame(function=code.co_qualname, file=code.co_filename,
                                line=frame.f_lineno,
                                code=_cached_line(code.co_filename, frame.f_lineno)))
            frame = frame.f_back
        frames.reverse()
        thread = threads.get(ident)
        stacks.append(ThreadStack(
            id=ident, name=thread.name if thread else None, frames=frames,
            os_thread_id=thread.native_id if thread else None, is_main=ident == main_ident))
    stacks.sort(key=lambda t: not t.is_main)
    return stacks


def _cached_line(filename: str, line: int | None) -> str | None:
    """The line's text as linecache already holds it (a notebook cell's code is there: IPython
    puts it there), never read from disk: a hung filesystem must not hang the agent."""
    lines = (linecache.cache.get(filename) or (None, None, None))[2]
    if not lines or not line or line > len(lines):
        return None
    return lines[line - 1].strip()


class FaultDump:
    """faulthandler on DUMP_SIGNAL, writing into a private file. Only when nobody else uses the
    signal: an application's own handler is never replaced."""

    def __init__(self, directory: str | None = None):
        self.path: str | None = None
        self.signum: int | None = None
        self._file = None
        if signal.getsignal(DUMP_SIGNAL) not in (signal.SIG_DFL, None):
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        fd, path = tempfile.mkstemp(prefix=f"hangkit-stacks-{os.getpid()}-", suffix=".txt",
                                    dir=directory)
        self._file = os.fdopen(fd, "w")
        faulthandler.register(DUMP_SIGNAL, file=self._file, all_threads=True, chain=False)
        self.path, self.signum = path, int(DUMP_SIGNAL)

    def close(self) -> None:
        if self._file is None:
            return
        with contextlib.suppress(Exception):
            faulthandler.unregister(DUMP_SIGNAL)
        self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self._file = None
