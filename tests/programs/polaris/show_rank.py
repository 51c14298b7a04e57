"""The training command of a generated job script run locally: each rank writes what it was
started with (its arguments, the variables the script sets, whether its TMPDIR exists) to
$HANGKIT_TEST_OUT/rank-<PMI_RANK>.json, then says so on stdout. With HANGKIT_TEST_HANG=1 it
then hangs, silent, in signal.pause() (the record is its readiness signal)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

NAMES = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR",
         "MASTER_PORT", "HANG_TIMEOUT", "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "WANDB_SILENT",
         "TMPDIR")

rank = os.environ["PMI_RANK"]
tmpdir = os.environ.get("TMPDIR", "")
record = {"argv": sys.argv[1:], "env": {name: os.environ.get(name) for name in NAMES},
          "tmpdir_exists": bool(tmpdir) and os.path.isdir(tmpdir), "cwd": os.getcwd()}
Path(os.environ["HANGKIT_TEST_OUT"], f"rank-{rank}.json").write_text(json.dumps(record))
print(f"rank {rank} done")
if os.environ.get("HANGKIT_TEST_HANG") == "1":
    while True:
        signal.pause()
