"""Runs a command while N busy processes compete for the cores, as on a shared login or compute
node: `python tests/under_load.py 2 -- make test`. Exits with the command's exit code.

The hogs spin in pure Python at normal priority, and are ended (and waited for) whatever the
command does, so none is left behind. benchmarks/bench_trust.py loads the cores with the same
busy_cores().
"""

from __future__ import annotations

import contextlib
import multiprocessing
import subprocess
import sys


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_cores(n: int = 2):
    """n busy processes competing for the cores while the block runs."""
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for hog in hogs:
        hog.start()
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.join(10)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: under_load.py N -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    with busy_cores(int(argv[0])):
        return subprocess.call(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
