"""Writes LINES lines of exactly 80 bytes to stdout as fast as it can, with default buffering.

Usage: python flood_job.py [LINES]. When done it prints "flood: wrote N lines in S s" to stderr,
S measured by the job itself from its first write to its final flush (start-up not included).
"""

import sys
import time

LINE_BYTES = 80


def main() -> int:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    filler = "x" * (LINE_BYTES - len("step 00000000 ") - 1)
    write = sys.stdout.write
    start = time.perf_counter()
    for i in range(lines):
        write(f"step {i:08d} {filler}\n")
    sys.stdout.flush()
    elapsed = time.perf_counter() - start
    print(f"flood: wrote {lines} lines in {elapsed:.6f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
