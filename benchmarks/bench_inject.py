"""Benchmark of the hook that starts an agent in every rank with no code change
(hangkit/bootstrap.py as a sitecustomize; hangkit/inject.py): two figures, each with its ratio
to its goal.

1. Start-up cost per Python process that is not a rank, under the hook: the same command with
   and without it (a real hook directory, a monitor's address and key in the environment),
   PAIRS pairs run one after the other in alternating order, wall time of each whole process;
   the median of the pairs' differences. Three shapes: `python -c pass` with a rank's
   variables (a spawned DataLoader worker, a `python -c` helper), a script below a rank (a
   compile worker: it inherits the rank's variables and the rank's pid), a script with no rank
   variables (pip, a tool). Goal: <= 5 ms each. Beside them, for information: what a rank
   pays to start its agent (the import of hangkit's agent and pyzmq, a thread).
2. Loop overhead with the agent injected, and no progress() call: a plain loop of 5 ms steps
   (programs/plain_steps.py, a busy-wait on its thread's CPU clock) in processes with the hook
   and RANK set, reporting to a Monitor in a process of its own, against the same loop with no
   hook; RUNS processes each way, ABBA order, ROUNDS rounds of STEPS steps each. Medians, as
   in bench_agent.py's figure 2: judged on wall time less the time the kernel kept the loop
   off a core (schedstat), plain wall time and process CPU time beside it. Goal: <= 0.5 %.

Run from the repository root:  .venv/bin/python benchmarks/bench_inject.py   (about 2 minutes)

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

from benchrun import end_all, job_env, judged, load_line, measure_all, print_summary, read_line

from hangkit.inject import inject_environment, remove_hook

PROGRAMS = Path(__file__).resolve().parent / "programs"
PAIRS = 120
RUNS, ROUNDS, STEPS = 8, 3, 100
CLOCKS = ("wall", "wall less run-queue wait", "process CPU")


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, timeout=60, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def hooked(env: dict[str, str], hook_env: dict[str, str]) -> dict[str, str]:
    """env under the hook: its directory on the path, and a monitor to report to."""
    keep = ("PYTHONPATH", "HANGKIT_INJECT", "HANGKIT_WATCHER_PID")
    return {**env, **{k: hook_env[k] for k in keep if k in hook_env},
            "HANGKIT_MONITOR": "tcp://127.0.0.1:9", "HANGKIT_MONITOR_KEY": "0" * 64}


# ---------------------------------------------------------------- 1. start-up cost, non-ranks


def figure_startup(workdir: Path) -> list[tuple[bool | None, str]]:
    script = workdir / "tool.py"
    script.write_text("")
    base = job_env()
    for name in ("PYTHONPATH", "HANGKIT_INJECT", "RANK", "HANGKIT_RANK_PID"):
        base.pop(name, None)
    hook_env, hook = inject_environment(base)
    try:
        py = sys.executable
        shapes = [
            ("`python -c pass` with a rank's variables (a spawned DataLoader worker)",
             [py, "-c", "pass"], {"RANK": "0", "WORLD_SIZE": "2"}),
            ("a script below a rank (a compile worker)",
             [py, str(script)], {"RANK": "0", "WORLD_SIZE": "2", "HANGKIT_RANK_PID": "1"}),
            ("a script with no rank variables (pip, a tool)", [py, str(script)], {}),
        ]
        out = []
        for what, argv, extra in shapes:
            bare_env = {**base, **extra}
            hook_one = hooked(bare_env, hook_env)
            for env in (bare_env, hook_one):  # warm the page cache and the hook's .pyc
                timed(argv, env)
            diffs: dict[bool, list[float]] = {False: [], True: []}  # by: hooked ran first
            bare, with_hook = [], []
            for i in range(PAIRS):
                order = (False, True) if i % 2 else (True, False)
                got = {h: timed(argv, hook_one if h else bare_env) for h in order}
                bare.append(got[False])
                with_hook.append(got[True])
                diffs[order[0]].append(got[True] - got[False])
            # Which of a pair runs first moves its time (this machine's scheduling, caches):
            # the two orders' medians, averaged, cancel that.
            first, second = (statistics.median(diffs[o]) * 1000 for o in (True, False))
            ms = (first + second) / 2
            print(f"  {what}: fastest {min(bare) * 1000:.1f} ms bare, "
                  f"{min(with_hook) * 1000:.1f} ms under the hook; median difference "
                  f"{first:+.2f} ms with the hook run first, {second:+.2f} ms run second")
            out.append(judged(f"start-up cost of {what}, {PAIRS} pairs", f"{ms:+.2f} ms",
                              "<= 5 ms", max(ms, 0) / 5, ms <= 5))
        rank_env = {**base, "RANK": "0", "WORLD_SIZE": "1"}
        rank_hooked = hooked(rank_env, hook_env)
        costs = [timed([py, str(script)], rank_hooked) - timed([py, str(script)], rank_env)
                 for _ in range(20)]
        out.append((None, f"for information, a rank's start with its agent (hangkit's agent "
                          f"and pyzmq imported, its thread started), median of 20: "
                          f"{statistics.median(costs) * 1000:+.1f} ms"))
        return out
    finally:
        remove_hook(hook)


# ------------------------------------------------------------------- 2. loop overhead


def steps(argv: list[str], env: dict[str, str]) -> tuple[list[list[float]], bool]:
    done = subprocess.run(argv, env=env, check=True, timeout=120, capture_output=True,
                          text=True)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return lines[:-1], lines[-1]["agent"]


def figure_overhead(workdir: Path) -> list[tuple[bool, str]]:
    monitor = subprocess.Popen([sys.executable, str(PROGRAMS / "monitor_only.py")],
                               stdout=subprocess.PIPE, env=job_env())
    base = {k: v for k, v in job_env().items() if k not in ("PYTHONPATH", "HANGKIT_INJECT")}
    base.update(RANK="0", WORLD_SIZE="1")
    hook_env, hook = inject_environment(base)
    runs: dict[bool, list[list[float]]] = {False: [], True: []}
    try:
        hello = json.loads(read_line(monitor, time.monotonic() + 30))
        injected = {**hooked(base, hook_env), "HANGKIT_MONITOR": hello["address"],
                    "HANGKIT_MONITOR_KEY": hello["key"]}
        argv = [sys.executable, str(PROGRAMS / "plain_steps.py"), str(ROUNDS), str(STEPS)]
        for r in range(RUNS):
            for inject in ((False, True) if r % 2 else (True, False)):  # ABBA: drift cancels
                rounds, agent = steps(argv, injected if inject else base)
                assert agent == inject, f"agent running: {agent}, expected {inject}"
                runs[inject] += rounds
        monitor.terminate()
        counts = json.loads(read_line(monitor, time.monotonic() + 30))
    finally:
        end_all(monitor)
        remove_hook(hook)
    print(f"  the monitor received {counts['beats']} beats from the injected agents")
    pct = {}
    for i, clock in enumerate(CLOCKS):
        bare, inj = (statistics.median(t[i] for t in runs[v]) for v in (False, True))
        pct[clock] = (inj - bare) / bare * 100
        print(f"  {clock}: {bare * 1e3:.4f} ms a step bare, {inj * 1e3:.4f} ms with the agent "
              f"injected: {pct[clock]:+.3f} %")
    shown = pct[CLOCKS[1]]
    return [judged(f"overhead on 5 ms steps with the agent injected (no progress() calls), "
                   f"{CLOCKS[1]}", f"{shown:+.3f} %", "<= 0.5 %", max(shown, 0) / 0.5,
                   shown <= 0.5 and counts["beats"] > 0)]


FIGURES = [
    ("1. Start-up cost per Python process that is not a rank, under the hook", figure_startup),
    ("2. Loop overhead on 5 ms steps with the agent injected", figure_overhead),
]


def main() -> int:
    started = time.monotonic()
    print(load_line())
    with tempfile.TemporaryDirectory(prefix="hk-bench-inject-") as tmp:
        results = measure_all(FIGURES, Path(tmp), end=end_all)
    print_summary(results, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
