"""Benchmark of the verdicts' trust: how late a real hang is called, how often a healthy job is
killed, and what looking before calling costs. Each figure is printed with its ratio to its goal.

1. Detection latency. `hangkit watch --timeout 2` runs a program that prints, writes the time
   of its last output to a file and blocks forever (tests/programs/slow_open.py's kind of
   hang: every process waiting). Latency = the "HANG:" line's arrival - that time; the worst
   of 3. Goal: <= the timeout + 3 s (the confirmation window's goal); the window itself (the
   report's last look) is printed beside it.
2. False kills of a busy, silent start-up. tests/programs/busy_silent.py under `hangkit watch
   --timeout 2`: it prints once, then is silent for 6 s (three timeouts) while importing one
   module after another, then prints and exits 0. RUNS runs, while two busy processes take
   both cores. Goal: 0 runs ended by watch (exit 124).
3. False kills of the demo's start-up. `hangkit demo` RUNS times under the same load: four
   ranks importing torch and forming a gloo group before their first output. A run counts as
   a false kill when watch calls a hang before rank 2 wanders off (the demo then names other
   ranks, or none); its verdict must name rank 2 alone. Goal: 0.
4. What a look costs, from the reports of figure 1: wall time a look adds to the capture it
   ends with, and the CPU it costs (watch and its py-spy children). Goals: < 3 s, < 2 s.

Run from the repository root:  .venv/bin/python benchmarks/bench_trust.py [--runs N]
(RUNS defaults to 20: about 12 minutes, most of it the demo).

Always exits 0; a missed goal is printed as MISSED. Every wait has a deadline, and every process
started here is ended before the script ends (checked afterwards by an environment marker).
"""

from __future__ import annotations

import argparse
import json
import os
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

ROOT = Path(__file__).resolve().parent.parent
TEST_PROGRAMS = ROOT / "tests" / "programs"
sys.path.insert(0, str(ROOT / "tests"))
from under_load import busy_cores  # noqa: E402  (the load `make test-loaded` runs under)

WATCH = [sys.executable, "-m", "hangkit", "watch"]
TIMEOUT = 2.0
WINDOW_GOAL = 3.0
LATENCY_RUNS = 3
RUN_DEADLINE = 300.0  # one watched run, start-up under load included

HANG = r"""
import sys, threading, time
from hangkit.files import write_atomic
print("started", flush=True)
write_atomic(sys.argv[1], repr(time.time()))  # the time of the last output, read whole
threading.Event().wait()  # every thread waits: nothing progresses
"""


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HANG_TIMEOUT"}
    return {**env, MARKER: MARKER_VALUE}


def watched(command: list[str], workdir: Path, *options: str) -> tuple[int, str, Path]:
    report = Path(tempfile.mkdtemp(dir=workdir, prefix="report-"))
    done = subprocess.run([*WATCH, "--report-dir", str(report), *options, "--", *command],
                          capture_output=True, text=True, env=job_env(), timeout=RUN_DEADLINE,
                          cwd=workdir)
    return done.returncode, done.stderr, report


# ------------------------------------------------------------------ 1 and 4: a real hang


def figure_latency(workdir: Path) -> list[tuple[bool, str]]:
    latencies, added, cpu = [], [], []
    for i in range(LATENCY_RUNS):
        stamp = workdir / f"last-output-{i}"
        report = Path(tempfile.mkdtemp(dir=workdir, prefix="report-"))
        proc = subprocess.Popen(
            [*WATCH, "--timeout", f"{TIMEOUT:g}", "--grace", "1", "--report-dir", str(report),
             "--", sys.executable, "-c", HANG, str(stamp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=job_env())
        called = None
        try:
            for line in proc.stderr:
                if "HANG:" in line:
                    called = time.time()
                    break
            proc.communicate(timeout=RUN_DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        if called is None:
            raise RuntimeError(f"run {i + 1}: no hang was called (exit {proc.returncode})")
        look = json.loads((report / "hang-report.json").read_text())["looks"][-1]
        latencies.append(called - float(stamp.read_text()))
        added.append(look["seconds"] - look["capture_seconds"])
        cpu.append(look["cpu_seconds"])
        print(f"  run {i + 1}: called {latencies[-1]:.2f} s after the last output; the look "
              f"took {look['seconds']:.2f} s ({look['capture_seconds']:.2f} s of it the "
              f"capture), {look['cpu_seconds']:.2f} s of CPU")
    worst, goal = max(latencies), TIMEOUT + WINDOW_GOAL
    return [
        judged(f"detection latency with --timeout {TIMEOUT:g}, worst of {LATENCY_RUNS}",
               f"{worst:.2f} s (the window: {worst - TIMEOUT:.2f} s)", f"<= {goal:g} s",
               worst / goal, worst <= goal),
        judged("wall time a look adds to its capture, worst", f"{max(added):.2f} s", "< 3 s",
               max(added) / 3, max(added) < 3),
        judged("CPU of a look (watch and py-spy), worst", f"{max(cpu):.2f} s", "< 2 s",
               max(cpu) / 2, max(cpu) < 2),
    ]


# ------------------------------------------------------------------ 2 and 3: false kills


def figure_busy_startup(workdir: Path, runs: int) -> list[tuple[bool, str]]:
    kills = 0
    with busy_cores(2):
        for i in range(runs):
            code, err, _ = watched([sys.executable, str(TEST_PROGRAMS / "busy_silent.py"),
                                    f"{3 * TIMEOUT:g}"], workdir, "--timeout", f"{TIMEOUT:g}",
                                   "--grace", "1")
            kills += code == 124
            looks = err.count("progressing: ")
            print(f"  run {i + 1}: exit {code}, {looks} look(s) found it progressing")
    return [judged(f"false kills of a busy, silent start-up under load, {runs} runs",
                   f"{kills}", "0", float(kills), kills == 0)]


def figure_demo(workdir: Path, runs: int) -> list[tuple[bool, str]]:
    wrong = 0
    with busy_cores(2):
        for i in range(runs):
            run_dir = Path(tempfile.mkdtemp(dir=workdir, prefix="demo-"))
            done = subprocess.run([sys.executable, "-m", "hangkit", "demo"], capture_output=True,
                                  text=True, env=job_env(), timeout=RUN_DEADLINE, cwd=run_dir)
            wrong += done.returncode != 0
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
            print(f"  run {i + 1}: exit {done.returncode}: {last}")
    return [judged(f"demo runs under load whose verdict was not rank 2 alone, {runs} runs",
                   f"{wrong}", "0", float(wrong), wrong == 0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    started = time.monotonic()
    print(load_line())
    figures = [
        ("1. detection latency, and 4. what a look costs", figure_latency),
        ("2. a busy, silent start-up under load",
         lambda workdir: figure_busy_startup(workdir, runs)),
        ("3. the demo under load", lambda workdir: figure_demo(workdir, runs)),
    ]
    with tempfile.TemporaryDirectory(prefix="hk-bench-trust-") as tmp:
        results = measure_all(figures, Path(tmp), end=kill_marked)
    print_summary(results, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
