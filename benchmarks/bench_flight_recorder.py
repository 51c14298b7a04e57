"""Benchmark of torch's Flight Recorder as hangkit uses it. Each figure is printed with its ratio
to its goal.

1. Recorder overhead. benchmarks/programs/ddp_steps.py, a 4-rank DDP loop on gloo with several
   gradient buckets a step, under mpiexec: steps per second with the recorder on
   (TORCH_FR_BUFFER_SIZE=2000, what `hangkit watch` sets) divided by the same with it off (0).
   PAIRS runs of each, interleaved (and which goes first alternating) so that the machine's
   load falls on both alike; the ratio of the medians. Goal: >= 0.98.
2. Time added at capture by dump and merge, for 4 ranks. tests/programs/flight_recorder_ddp.py
   (rank 1 skips a step; the others wait in DDP's all-reduce) on 4 ranks reporting to a
   Monitor started here. Once every rank is in place: the wall time of asking the 4 agents for
   their dumps (they dump at once, each in its own process), and of merging them and running
   the rules. Goal: < 1 s for the two together. The capture as a whole is printed beside it:
   the dumps are asked for while py-spy runs, so they add to it only what is left over.

Run from the repository root:  .venv/bin/python benchmarks/bench_flight_recorder.py [--pairs N]

Always exits 0; a missed goal is printed as MISSED. Every wait has a deadline, and every process
started here is ended before the script ends (checked afterwards by an environment marker).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchrun import (
    MARKER,
    MARKER_VALUE,
    judged,
    kill_marked,
    load_line,
    measure_all,
    print_summary,
)

from hangkit.flight_recorder.rules import diagnose_views
from hangkit.flight_recorder.view import merge
from hangkit.launcher import free_port
from hangkit.monitor.capture import capture_job
from hangkit.monitor.server import Monitor
from hangkit.records import Recording

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = str(Path(sys.executable).with_name("mpiexec"))
RANKS = 4
STEPS = 600
RUN_DEADLINE = 300.0


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, MARKER: MARKER_VALUE, "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", **extra}


def steps_per_second(buffer: str) -> float:
    done = subprocess.run([MPIEXEC, "-n", str(RANKS), sys.executable,
                           str(ROOT / "benchmarks" / "programs" / "ddp_steps.py"), str(STEPS)],
                          env=environment(TORCH_FR_BUFFER_SIZE=buffer), capture_output=True,
                          text=True, timeout=RUN_DEADLINE)
    found = re.search(r"steps_per_second=([\d.]+)", done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"ddp_steps.py exited {done.returncode}: {done.stderr[-500:]}")
    return float(found.group(1))


def figure_overhead(_workdir: Path, pairs: int):
    on, off = [], []
    for i in range(pairs):
        # Which runs first alternates, so that neither is favoured by what ran before it.
        for buffer, into in (("0", off), ("2000", on))[::1 if i % 2 else -1]:
            into.append(steps_per_second(buffer))
        print(f"  pair {i + 1}: off {off[-1]:.1f}, on {on[-1]:.1f} steps/s")
    ratio = statistics.median(on) / statistics.median(off)
    return judged(f"steps/s with the recorder on / off, 4-rank DDP on gloo, median of {pairs}",
                  f"{ratio:.3f} ({statistics.median(on):.1f} / {statistics.median(off):.1f})",
                  ">= 0.98", ratio / 0.98, ratio >= 0.98)


def figure_capture(workdir: Path):
    ready = workdir / "ready"
    ready.mkdir()
    with Monitor() as monitor:
        env = environment(HANGKIT_READY_DIR=str(ready), TORCH_FR_BUFFER_SIZE="2000",
                          **monitor.environment())
        job = subprocess.Popen(
            [MPIEXEC, "-n", str(RANKS), sys.executable,
             str(ROOT / "tests" / "programs" / "flight_recorder_ddp.py"), "skip"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            keys = wait_for_the_hang(monitor, ready)
            started = time.monotonic()
            dumps = monitor.request_recordings(keys, timeout=10.0)
            dumped = time.monotonic() - started
            recordings = [Recording(rank=int(k.split()[1]), dump=dump)
                          for k, (dump, _) in dumps.items() if dump]
            started = time.monotonic()
            found = diagnose_views(merge(recordings, world=list(range(RANKS))))
            merged = time.monotonic() - started
            started = time.monotonic()
            capture_job(monitor, monitor.statuses(), [job.pid, *child_pids(job.pid)])
            captured = time.monotonic() - started
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
    print(f"  {len(recordings)} dumps in {dumped:.3f} s, merged and diagnosed in "
          f"{merged:.3f} s: {found[0].kind if found else 'no verdict'}; the whole capture "
          f"(stacks, py-spy, dumps) {captured:.2f} s")
    if len(recordings) != RANKS or not found:
        raise RuntimeError(f"{len(recordings)} dumps, verdicts {found}")
    total = dumped + merged
    return judged("time added at capture by dump and merge, 4 ranks", f"{total:.3f} s", "< 1 s",
                  total / 1.0, total < 1.0)


def wait_for_the_hang(monitor: Monitor, ready: Path) -> list[str]:
    """The ranks' keys once each has recorded its readiness and the waiting ones are inside
    the all-reduce (as their agents' beats say)."""
    deadline = time.monotonic() + RUN_DEADLINE
    while time.monotonic() < deadline:
        ranks = monitor.statuses()
        inside = [r for r in ranks if r.collective is not None and r.collective.inside]
        if len(list(ready.glob("pid-*.json"))) == RANKS and len(inside) == RANKS - 1:
            return [r.key for r in ranks]
        time.sleep(0.2)  # polled against a deadline: the ranks start at their own pace
    raise RuntimeError("the job did not reach its hang in time")


def child_pids(pid: int) -> list[int]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7)
    pairs = parser.parse_args().pairs
    started = time.monotonic()
    print(load_line())
    figures = [
        ("1. recorder overhead", lambda workdir: figure_overhead(workdir, pairs)),
        ("2. dump and merge at capture", figure_capture),
    ]
    with tempfile.TemporaryDirectory(prefix="hk-bench-fr-") as tmp:
        results = measure_all(figures, Path(tmp), end=kill_marked)
    print_summary(results, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
