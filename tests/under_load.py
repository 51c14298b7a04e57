"""Runs a command while N busy processes compete for the cores, as on a shared login or compute
node: `python tests/under_load.py 2 -- make test`. Exits with the command's exit code.

The hogs spin in pure Python at normal priority, one per core asked for, and are ended (and
waited for) whatever the command does, so none is left behind.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys


def spin() -> None:
    while True:
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: under_load.py N -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(int(argv[0]))]
    for hog in hogs:
        hog.start()
    try:
        return subprocess.call(argv[2:])
    finally:
        for hog in hogs:
            hog.kill()
            hog.join(10)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
