"""A rank that advances for a while, then stops for good: bench_agent.py's detection figure.

Usage: python agent_rank_stops.py OUTFILE, with $HANGKIT_MONITOR, $HANGKIT_MONITOR_KEY, RANK and
WORLD_SIZE set (the first progress() call starts the agent from them). Calls progress() every
5 ms for ADVANCE seconds, writes the wall time of its last call to OUTFILE, then blocks forever
with its sidecar still beating, as a rank stuck in a collective would.
"""

import sys
import threading
import time

from hangkit.agent import current_agent, progress
from hangkit.files import write_atomic

ADVANCE = 1.5  # long enough for the agent to connect and send beats that show progress


def main() -> int:
    out = sys.argv[1]
    deadline = time.monotonic() + ADVANCE
    step = 0
    while time.monotonic() < deadline:
        progress(step=step, phase="train")
        step += 1
        time.sleep(0.005)
    progress(step=step, phase="train")
    last = time.time()
    if current_agent() is None:
        print("agent_rank_stops: no agent started (monitor variables missing?)", file=sys.stderr)
        return 1
    write_atomic(out, repr(last))  # the reader never sees a half-written file
    threading.Event().wait()  # never set: stuck, as in a collective that never returns
    return 0


if __name__ == "__main__":
    sys.exit(main())
