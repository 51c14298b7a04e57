"""A normal chatty training job: one log line every INTERVAL seconds, LINES lines, then exit 0.

Usage: python chatty_job.py [LINES] [INTERVAL]. Line i reads "step i ..." so the benchmark can
tell how far the job is from what it receives.
"""

import sys
import time


def main() -> int:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    start = time.monotonic()
    for i in range(1, lines + 1):
        print(f"step {i} loss {1.0 / i:.6f} lr 0.001", flush=True)
        # A fixed schedule, so the job lasts lines * interval however long printing takes.
        time.sleep(max(0.0, start + i * interval - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
