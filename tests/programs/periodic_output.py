"""Prints a line every INTERVAL seconds for DURATION seconds, then exits 0: never long silent."""

import sys
import time

interval, duration = float(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + duration
n = 0
while time.monotonic() < end:
    print(f"tick {n}", flush=True)
    n += 1
    time.sleep(interval)  # ok-sleep: the output's period, what the test is about
print("done", flush=True)
