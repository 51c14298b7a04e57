"""Benchmark of `hangkit doctor`: its wall time for all probes on 1 and 4 ranks, and what one
hanging probe adds.

1. All probes, this process's environment (no --ranks): wall time of run_doctor(), against the
   sum of the probes' own times (what running them one after the other would take at least).
2. All probes on 4 local MPI ranks (--ranks 4): wall time, the same way.
3. One probe made to hang: the filesystem probe's --path holds a FIFO, whose open() never
   returns (as a file on a hung shared filesystem). Added wall time = (3) - (1), against the
   probe's own timeout. Goal: a hanging probe adds no more than its own timeout (ratio <= 1).

Every figure uses --timeout 30 (the default). Run from the repository root:
    .venv/bin/python benchmarks/bench_doctor.py   (a few minutes on 2 cores)

Always exits 0; a missed goal is printed as MISSED.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchrun import load_line

from hangkit.probes.runner import DEFAULT_TIMEOUT, run_doctor

TIMEOUT = DEFAULT_TIMEOUT


def timed(**kwargs) -> tuple[float, list]:
    started = time.monotonic()
    results = run_doctor(timeout=TIMEOUT, **kwargs)
    return time.monotonic() - started, results


def describe(label: str, wall: float, results) -> None:
    statuses = Counter(r.status for r in results)
    slowest = max(results, key=lambda r: r.seconds)
    print(f"{label}: {wall:.1f} s wall for {len(results)} results "
          f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); slowest "
          f"{slowest.name} {slowest.seconds:.1f} s; probes' own times add up to "
          f"{sum(r.seconds for r in results):.1f} s")


def main() -> int:
    print(load_line(f"; --timeout {TIMEOUT:g}"))
    with tempfile.TemporaryDirectory(prefix="hk-bench-doctor-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "shard-000.bin").write_bytes(os.urandom(1 << 16))
        wall1, results1 = timed(path=data)
        describe("1. all probes, 1 process", wall1, results1)
        wall4, results4 = timed(path=data, ranks=4)
        describe("2. all probes, 4 ranks", wall4, results4)
        os.mkfifo(data / "shard-001.bin")  # open() never returns: a hung filesystem
        wall_hang, results_hang = timed(path=data)
        describe("3. all probes, filesystem made to hang", wall_hang, results_hang)
        (fs,) = [r for r in results_hang if r.name == "filesystem"]
        print(f"   filesystem: {fs.status}: {fs.detail}")
    added = wall_hang - wall1
    met = added <= TIMEOUT and fs.status == "timeout"
    print()
    print(f"doctor wall time, all probes, 1 process: {wall1:.1f} s")
    print(f"doctor wall time, all probes, 4 ranks: {wall4:.1f} s")
    print(f"time a hanging probe adds: {added:.1f} s (goal <= its timeout, {TIMEOUT:g} s; "
          f"ratio to goal {added / TIMEOUT:.2f}, {'met' if met else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
