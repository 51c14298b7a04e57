"""One probe in one process: `python -m hangkit.probes.child NAME CONFIG_JSON`.

Under --ranks this process is an MPI rank (started by mpiexec) and writes its result to
CONFIG["out"]/rank-R.json; otherwise it prints the result on stdout after RESULT_MARKER.
Anything the probe raises becomes a "fail" naming the exception: never a traceback to the user.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

from hangkit.files import write_atomic
from hangkit.probes import REGISTRY
from hangkit.probes.api import Outcome, ProbeContext
from hangkit.rankenv import rank_from_environ, world_size_from_environ
from hangkit.records import ProbeResult

RESULT_MARKER = "HANGKIT-PROBE-RESULT "


def run_probe(name: str, ctx: ProbeContext) -> ProbeResult:
    try:
        outcome = importlib.import_module(REGISTRY[name]).run(ctx)
    except Exception as e:
        outcome = Outcome("fail", f"the probe itself failed: {type(e).__name__}: {e}",
                          "This is a hangkit bug if the message is not about your "
                          "environment; please report it with this line.")
    return ProbeResult(name=name, rank=ctx.rank, status=outcome.status,
                       seconds=round(time.monotonic() - ctx.started, 3), detail=outcome.detail,
                       advice=outcome.advice, data=outcome.data)


def main(argv: list[str]) -> int:
    name, config = argv[0], json.loads(argv[1])
    ranked = config.get("out") is not None
    ctx = ProbeContext(timeout=config["timeout"], path=config["path"], name=name,
                       out=config.get("out"),
                       rank=rank_from_environ(os.environ) if ranked else None,
                       world_size=world_size_from_environ(os.environ) if ranked else None,
                       # The deadline counts from when the doctor started this process.
                       started=time.monotonic() - max(time.time() - config["started_at"], 0.0))
    result = json.dumps(run_probe(name, ctx).to_json())
    if ranked:
        write_atomic(os.path.join(config["out"], f"rank-{ctx.rank}.json"), result)
    else:
        sys.stdout.write(RESULT_MARKER + result + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
