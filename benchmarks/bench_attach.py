"""Benchmark of `hangkit attach` on a job hangkit did not start: one figure, with its ratio to
its goal.

Attach to verdict: 4 ranks (mpiexec, torch gloo, DDP) with 2 DataLoader workers each
(tests/programs/attach_job.py hang: rank 1 wanders off after step 3, the others wait in the
gradients' allreduce), nothing of hangkit's in them. Once every rank is where it stays,
`hangkit attach MPIEXEC_PID` runs as a user runs it, a new process, RUNS times; the figure is
the median wall time from its start to its exit with the verdict (124, the wandering rank
named). Goal: < 5 s.

Run from the repository root:  .venv/bin/python benchmarks/bench_attach.py   (about a minute)

Always exits 0; a missed goal is printed as MISSED. Every process started here is ended before
the script ends (checked afterwards by an environment marker).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchrun import end_all, job_env, judged, load_line, measure_all, print_summary

from hangkit.launcher import free_port

JOB = Path(__file__).resolve().parents[1] / "tests" / "programs" / "attach_job.py"
RANKS = 4
RUNS = 5
GOAL_SECONDS = 5.0
START_SECONDS = 300.0


def attach_to_verdict(workdir: Path):
    ready = workdir / "ready"
    ready.mkdir()
    env = job_env(HANGKIT_READY_DIR=str(ready), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", ATTACH_JOB_WANDERING="1")
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    job = subprocess.Popen([mpiexec, "-n", str(RANKS), sys.executable, str(JOB), "hang"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_SECONDS
        while len(list(ready.glob("rank-*.json"))) < RANKS:
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the job did not get ready (exit {job.poll()})")
            time.sleep(0.2)  # polling the readiness records, against a deadline
        workers = sum(len(json.loads(p.read_text())["workers"])
                      for p in ready.glob("rank-*.json"))
        seconds = []
        for i in range(RUNS):
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "hangkit", "attach", str(job.pid),
                                   "--report-dir", str(workdir / f"report-{i}")],
                                  capture_output=True, text=True, timeout=300, env=env)
            seconds.append(time.monotonic() - started)
            if done.returncode != 124 or "rank 1 never reached it" not in done.stderr:
                raise RuntimeError(f"attach said {done.returncode}: {done.stderr[-1500:]}")
        median = statistics.median(seconds)
        shown = (f"{median:.2f} s median over {RUNS} runs on {RANKS} ranks and {workers} "
                 f"DataLoader workers (runs: {', '.join(f'{s:.2f}' for s in seconds)})")
        return judged("Attach to verdict", shown, f"< {GOAL_SECONDS:g} s",
                      median / GOAL_SECONDS, median < GOAL_SECONDS)
    finally:
        end_all(job)


def main() -> None:
    started = time.monotonic()
    print(load_line())
    with tempfile.TemporaryDirectory(prefix="hk-bench-attach-") as workdir:
        results = measure_all([("Attach to verdict (hangkit attach, a job hangkit did not "
                                "start)", attach_to_verdict)], Path(workdir), end=end_all)
    print_summary(results, started)


if __name__ == "__main__":
    main()
