"""`hangkit demo`, the main job behind `make demo`: it must catch the hang and name rank 2."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import mpiexec


def test_demo_catches_rank_2_wandering_off(tmp_path):
    mpiexec()  # skips when MPI is not installed
    done = subprocess.run([sys.executable, "-m", "hangkit", "demo"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "hangkit-demo-report" / "hang-report.json").read_text())
    (td01,) = [d for d in report["diagnosis"] if d["kind"] == "TD-01"]
    assert td01["ranks"] == [2] and "save_checkpoint" in td01["summary"]
    assert "Merged stacks of the ranks' main threads:" in done.stderr
    assert "[rank 2] save_checkpoint" in done.stderr
    assert "the diagnosis names rank 2" in done.stderr
