"""Benchmark of `%%hk` cells on 4 real MPI engines, in an IPython shell (what a notebook's kernel
runs). Each figure is printed with its ratio to its goal.

1. Overhead of `%%hk` over `%%px` for a trivial cell (`x = 1`): the medians of RUNS cells each,
   interleaved. Goal: <= 0.3 s.
2. Time from the deadline to the verdict shown: a `%%hk --timeout 3` cell whose ranks sleep,
   timed from the cell's start to its return, less the 3 s. Goal: <= 3 s.
3. A hung %%hk cell returns within --silence + 3 s: a `%%hk --timeout 300 --silence 3` cell
   whose DataLoader worker hangs in the cell's own Dataset (no output, no hangkit.progress()),
   on new engines with torch already imported, timed from the cell's start to its return, less
   the 3 s of silence. Goal: <= 3 s.

Run from the repository root:  .venv/bin/python benchmarks/bench_notebook_cells.py [--runs N]

Always exits 0; a missed goal is printed as MISSED. The cluster is closed at the end, and every
process started here is checked for afterwards by an environment marker.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchrun import (
    MARKER,
    MARKER_VALUE,
    judged,
    kill_marked,
    load_line,
    measure_all,
    print_summary,
)
from test_jupyter_magic import HUNG_WORKER  # noqa: E402  the test's cell

DEADLINE = 3.0
SILENCE = 3.0


def figure_overhead(shell, runs: int):
    hk, px = [], []
    for _ in range(runs):
        for magic, into in (("px", px), ("hk", hk)):
            started = time.monotonic()
            with contextlib.redirect_stdout(io.StringIO()):
                shell.run_cell_magic(magic, "", "x = 1")
            into.append(time.monotonic() - started)
    extra = statistics.median(hk) - statistics.median(px)
    return judged(f"%%hk over %%px for a trivial cell, median of {runs}",
                  f"{extra:.3f} s ({statistics.median(hk):.3f} s against "
                  f"{statistics.median(px):.3f} s)", "<= 0.3 s", extra / 0.3, extra <= 0.3)


def figure_deadline(shell, workdir: Path):
    printed = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(printed):
        shell.run_cell_magic("hk", f"--timeout {DEADLINE:g}", "import time\ntime.sleep(600)")
    after = time.monotonic() - started - DEADLINE
    if "hangkit: report:" not in printed.getvalue():
        raise RuntimeError(f"no verdict shown: {printed.getvalue()[-500:]}")
    return judged("deadline to verdict shown, 4 engines", f"{after:.2f} s", "<= 3 s",
                  after / 3.0, after <= 3.0)


def figure_silence(shell, cluster):
    cluster.restart()  # figure 2 leaves its ranks asleep
    with contextlib.redirect_stdout(io.StringIO()):
        shell.run_cell_magic("hk", "--timeout 120", "import torch")  # not part of the figure
    printed = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(printed):
        shell.run_cell_magic("hk", f"--timeout 300 --silence {SILENCE:g}", HUNG_WORKER)
    took = time.monotonic() - started
    run = cluster.cells[-1]
    if run.outcome != "silent" or "[DL-01]" not in printed.getvalue():
        raise RuntimeError(f"not the silent cell's verdict ({run.outcome}): "
                           f"{printed.getvalue()[-500:]}")
    after = took - SILENCE
    return judged(f"A hung %%hk cell returns within --silence + 3 s (--silence {SILENCE:g})",
                  f"{after:.2f} s after the silence ({took:.2f} s in all)", "<= 3 s",
                  after / 3.0, after <= 3.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    started = time.monotonic()
    print(load_line())
    os.environ[MARKER] = MARKER_VALUE
    os.environ["HANGKIT_NONINTERACTIVE"] = "1"
    with tempfile.TemporaryDirectory(prefix="hk-bench-cells-") as tmp:
        os.environ["IPYTHONDIR"] = str(Path(tmp) / "ipython")
        os.chdir(tmp)  # the deadline's report is written here
        from IPython.testing.globalipapp import start_ipython

        from hangkit.jupyter import EngineCluster

        shell = start_ipython()
        cluster = EngineCluster(4).start()
        try:
            view = cluster.client[:]
            view.block = True  # %%px waits for the cell, as %%hk does
            view.activate()  # %%px on the same engines
            shell.run_line_magic("load_ext", "hangkit.jupyter")
            figures = [("1. %%hk overhead", lambda _: figure_overhead(shell, runs)),
                       ("2. deadline to verdict", lambda w: figure_deadline(shell, w)),
                       ("3. silence to verdict", lambda _: figure_silence(shell, cluster))]
            results = measure_all(figures, Path(tmp), end=cluster.close)
        finally:
            cluster.close()
        os.chdir("/")
    kill_marked()
    print_summary(results, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
