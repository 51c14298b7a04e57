"""Passing a job's output through unchanged, and keeping its last lines for the report."""

from __future__ import annotations

import os
from collections import deque


class OutputTail:
    """The last `keep` lines of output, both streams, in arrival order. Cheap per chunk."""

    def __init__(self, keep: int = 50, max_line: int = 4096):
        self.keep = keep
        self.max_line = max_line
        self._lines: deque[bytes] = deque(maxlen=keep)
        self._partial: dict[int, bytes] = {}

    def feed(self, stream: int, data: bytes) -> None:
        # Only the chunk's last `keep` lines can matter: find where they start from the end,
        # so a large chunk of a flood of output is not split into thousands of lines.
        start = len(data)
        for _ in range(self.keep + 1):
            start = data.rfind(b"\n", 0, start)
            if start < 0:
                break
        # With `keep` newlines found, older lines and the partial line before them are gone.
        data = data[start + 1:] if start >= 0 else self._partial.get(stream, b"") + data
        parts = data.split(b"\n")
        self._partial[stream] = parts.pop()[-self.max_line:]
        self._lines.extend(line[-self.max_line:] for line in parts)

    def lines(self) -> list[str]:
        tail = list(self._lines) + [p for p in self._partial.values() if p]
        return [line.decode(errors="replace").rstrip("\r") for line in tail[-self.keep:]]


def write_all(fd: int, data: bytes) -> bool:
    """Writes everything; False when the reader is gone (the job's output then goes nowhere):
    a pipe whose reader left (EPIPE), a terminal hung up (EIO: watch after SIGHUP, its ssh
    session dropped), a closed descriptor. Never raises for those: what watch says on its way
    out (ending the job, the report's path) must not stop it from ending the job."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            raise  # a full non-blocking stream is not a gone reader
        except OSError:
            return False
        view = view[n:]
    return True
