"""The main job: a real 4-rank gloo training run in which rank 2 wanders off, caught by watch.

Ranks 0, 1 and 3 wait in the gradient all-reduce while rank 2 is stuck writing a checkpoint
(an open() that never returns, as on a hung shared filesystem). `hangkit watch` notices the
silence, captures every rank, and explains it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hangkit.errors import HangkitError, UsageError
from hangkit.launcher import find_mpiexec, free_port
from hangkit.monitor.watch import HANG_EXIT, WatchOptions, say, watch

WANDERING_RANK = 2
STARTUP_TIMEOUT = 300.0


def run_demo(*, ranks: int = 4, timeout: float = 10.0) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise HangkitError("the demo trains with torch, which is not installed",
                           hint="pip install 'hangkit[torch]'") from None
    if ranks <= WANDERING_RANK:
        raise UsageError(f"ranks must be at least {WANDERING_RANK + 1}, got {ranks}")
    workdir = tempfile.mkdtemp(prefix="hk-demo-")
    report_dir = Path.cwd() / "hangkit-demo-report"
    shutil.rmtree(report_dir, ignore_errors=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                      HANGKIT_DEMO_DIR=workdir)
    command = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "hangkit.demo.train"]
    say(f"demo: {ranks} ranks train with gloo; rank {WANDERING_RANK} will wander off")
    try:
        # Start-up (torch, gloo's rendezvous) gets minutes on a loaded machine, not the 10 s
        # of silence that count as a hang once the ranks train.
        code = watch(WatchOptions(command=command, timeout=timeout, grace=5.0,
                                  report_dir=report_dir, startup_timeout=STARTUP_TIMEOUT))
        if code != HANG_EXIT:
            say(f"demo: expected the hang to be caught (exit {HANG_EXIT}), got exit {code}")
            return 1
        report = json.loads((report_dir / "hang-report.json").read_text())
        blamed = [d["ranks"] for d in report["diagnosis"] if d["kind"] in ("TD-01", "MP-02")]
        if blamed != [[WANDERING_RANK]]:
            say(f"demo: the diagnosis did not name rank {WANDERING_RANK}, and only it: "
                f"{blamed or [d['kind'] for d in report['diagnosis']]}")
            return 1
        say(f"demo: caught; the diagnosis names rank {WANDERING_RANK}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
