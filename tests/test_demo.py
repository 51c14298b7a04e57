"""`hangkit demo`, the main job behind `make demo`: it must catch the hang and name rank 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import mpiexec


@pytest.mark.timeout(600)  # start-up on a loaded machine: four ranks importing torch
def test_demo_catches_rank_2_wandering_off(tmp_path):
    mpiexec()  # skips when MPI is not installed
    done = subprocess.run([sys.executable, "-m", "hangkit", "demo"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=540)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "hangkit-demo-report" / "hang-report.json").read_text())
    (td01,) = [d for d in report["diagnosis"] if d["kind"] == "TD-01"]
    assert td01["ranks"] == [2] and "save_checkpoint" in td01["summary"]
    (fifo,) = [d for d in report["diagnosis"] if d["kind"] == "fifo-wait"]
    assert fifo["ranks"] == [2] and "blocked opening the named pipe (FIFO)" in fifo["summary"]
    assert not [d for d in report["diagnosis"] if d["kind"] == "slow-filesystem"]
    assert report["looks"] and report["looks"][-1]["verdict"] == "hung"
    assert "Merged stacks of the ranks' main threads:" in done.stderr
    assert "[rank 2] save_checkpoint" in done.stderr
    assert "the diagnosis names rank 2" in done.stderr
