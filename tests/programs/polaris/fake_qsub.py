"""A stand-in for PBS's qsub, which cannot run off Polaris: it records exactly what it was
asked (its arguments, and the text of the file named by the first one) as JSON in
$FAKE_QSUB_RECORD, then acts as $FAKE_QSUB_MODE says:

- ok (default): prints a job id, as qsub does, and exits 0;
- fail: prints a PBS-like error on stderr and exits 38;
- hang: never answers (a PBS server that is down); the record is its readiness signal.

Tests put a `qsub` shim that runs this file first on PATH."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

JOB_ID = "12345.polaris-pbs-01"

args = sys.argv[1:]
script = Path(args[0]) if args else None
record = {"argv": args, "cwd": os.getcwd(),
          "script": script.read_text() if script and script.is_file() else None}
Path(os.environ["FAKE_QSUB_RECORD"]).write_text(json.dumps(record))
mode = os.environ.get("FAKE_QSUB_MODE", "ok")
if mode == "ok":
    print(JOB_ID)
elif mode == "fail":
    print("qsub: Job rejected by all possible destinations", file=sys.stderr)
    print("qsub: Unknown queue", file=sys.stderr)
    sys.exit(38)
elif mode == "hang":
    while True:
        signal.pause()
else:
    sys.exit(f"fake qsub: unknown FAKE_QSUB_MODE {mode!r}")
