"""filesystem: write, fsync, read, stat and listdir latency under --path, and a read of the
first bytes of files already there (a dataset directory, typically).

A stalled shared filesystem (Lustre, NFS) hangs whoever touches it: a DataLoader worker in
open() (DL-01), a checkpoint write. Each operation runs in a thread with a deadline, so a
stall is reported as the operation and file it stopped on. A FIFO among the files blocks on
open just like a file on a hung filesystem, and is reported the same way.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from hangkit import deadline
from hangkit.probes.api import Outcome, ProbeContext, fail, ok, timed_out, warn

# Above these (seconds) an operation is slow enough to stall training.
SLOW = {"write": 1.0, "fsync": 2.0, "read": 1.0, "stat": 0.2, "listdir": 2.0, "open": 1.0}
SAMPLE_FILES = 16  # existing files whose first bytes are read
TEMP_PREFIX = ".hangkit-doctor-"
ADVICE = ("I/O under this path is slow or stalled. Stage data to node-local storage "
          "(/local/scratch, /dev/shm) before training, avoid many small files (pack them), and "
          "pass DataLoader(timeout=...) so a stalled read raises instead of hanging (DL-01).")


def run(ctx: ProbeContext) -> Outcome:
    timings: dict[str, float] = {}

    def timed(what: str, op, budget: float):
        """op under a deadline; a stalled op's thread is left behind (the process exits)."""
        print(f"filesystem: {what}", file=sys.stderr, flush=True)  # the doctor's last words
        started = time.monotonic()
        pending = deadline.start(op, timeout=budget, name=what)
        if pending.wait():  # returned or raised: timed either way
            kind = what.split(" ")[0]
            timings[kind] = max(timings.get(kind, 0.0), time.monotonic() - started)
        return pending.result()

    def budget() -> float:
        return max(ctx.remaining(1.0) / 2, 0.1)

    try:
        existing = timed(f"listdir {ctx.path}", lambda: os.listdir(ctx.path), budget())
        fd, tmp = timed(f"create in {ctx.path}", lambda: tempfile.mkstemp(
            prefix=TEMP_PREFIX, dir=ctx.path), budget())
        try:
            payload = os.urandom(1 << 20)
            timed(f"write {tmp}", lambda: os.write(fd, payload), budget())
            timed(f"fsync {tmp}", lambda: os.fsync(fd), budget())
            timed(f"stat {tmp}", lambda: os.stat(tmp), budget())
            timed(f"read {tmp}", lambda: _read(tmp, 1 << 20), budget())
        finally:
            os.close(fd)
            os.unlink(tmp)
        # Other ranks' probe files come and go in a shared --path: not the data to sample.
        sample = sorted(n for n in existing if not n.startswith(TEMP_PREFIX))[:SAMPLE_FILES]
        for name in sample:
            path = os.path.join(ctx.path, name)
            if os.path.isdir(path):
                continue
            timed(f"open {path}", lambda p=path: _read(p, 4096), budget())
    except deadline.DeadlineExceeded as e:
        return timed_out(f"{e.what} did not return within {e.seconds:.1f} s", ADVICE,
                         stalled=e.what, **{k: round(v, 4) for k, v in timings.items()})
    except OSError as e:
        return fail(f"I/O error under {ctx.path}: {e}", "Check the path exists, is writable "
                    "and has space; the filesystem probe writes a 1 MB file there.")
    shown = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items())
    slow = [k for k, v in timings.items() if v > SLOW.get(k, 1.0)]
    data = {k: round(v, 4) for k, v in timings.items()}
    if slow:
        return warn(f"slow {', '.join(slow)} under {ctx.path}: {shown}", ADVICE, **data)
    return ok(f"{ctx.path}: {shown}", **data)


def _read(path: str, size: int) -> int:
    with open(path, "rb") as f:
        return len(f.read(size))
