"""A plain training loop's shape (no hangkit import, no progress() calls): ROUNDS rounds of
STEPS steps of 5 ms of this thread's CPU time each. Run with RANK set under an injected hook,
its agent runs beside the loop. Prints, per round, one JSON line: seconds per step by wall
clock, by wall clock less the time the kernel kept the loop off a core (schedstat), and by
process CPU time (all threads); then {"agent": whether hangkit's sidecar thread ran}.
Usage: plain_steps.py ROUNDS STEPS"""

import json
import sys
import threading
import time

STEP_NS = 5_000_000


def run_queue_ns() -> int:
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1])


def one_round(steps: int) -> list[float]:
    clock = time.thread_time_ns
    wall, queued, cpu = time.perf_counter(), run_queue_ns(), time.process_time()
    for _ in range(steps):
        end = clock() + STEP_NS
        while clock() < end:
            pass
    wall = time.perf_counter() - wall
    queued = (run_queue_ns() - queued) / 1e9
    return [wall / steps, (wall - queued) / steps, (time.process_time() - cpu) / steps]


def main() -> int:
    rounds, steps = int(sys.argv[1]), int(sys.argv[2])
    time.sleep(0.3)  # past the agent's start and first beat: the steady state only
    for _ in range(rounds):
        print(json.dumps(one_round(steps)), flush=True)
    agent = any(t.name == "hangkit-sidecar" for t in threading.enumerate())
    print(json.dumps({"agent": agent}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
