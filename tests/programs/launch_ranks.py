"""A minimal launcher: N copies of a command with RANK and WORLD_SIZE set, waited for.

Unlike mpiexec (and torchrun), it does not end the other ranks when one dies, as a rank lost
with its node leaves the others waiting. Usage: launch_ranks.py N COMMAND [ARGS...]
"""

import os
import subprocess
import sys

count, command = int(sys.argv[1]), sys.argv[2:]
ranks = [subprocess.Popen(command, env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(count)})
         for r in range(count)]
sys.exit(max(abs(p.wait()) for p in ranks))
