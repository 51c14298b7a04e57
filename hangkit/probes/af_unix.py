"""af_unix: the socket path multiprocessing would create under the current TMPDIR, really bound.

DataLoader workers and torch's file_descriptor sharing use AF_UNIX sockets under TMPDIR; a
socket path over 107 bytes fails with "AF_UNIX path too long" (or hangs a worker handshake),
and deep per-job TMPDIRs on HPC systems get there easily.
"""

from __future__ import annotations

import os
import tempfile
from multiprocessing.connection import Listener

from hangkit.envsetup import AF_UNIX_PATH_MAX
from hangkit.probes.api import Outcome, ProbeContext, fail, ok, warn

ADVICE = ("Point TMPDIR at a short directory before training starts (export TMPDIR=/tmp, or "
          "`hangkit watch` does it for you). The file_system sharing strategy does not help: "
          "torch_shm_manager puts its socket under TMPDIR too (DL-06).")


def run(ctx: ProbeContext) -> Outcome:
    wanted = ctx.environ.get("TMPDIR")
    used = tempfile.gettempdir()
    if wanted and os.path.realpath(wanted) != os.path.realpath(used):
        return warn(f"TMPDIR={wanted} is not a writable directory; Python falls back to {used}",
                    "Create the directory or point TMPDIR at one that exists: programs "
                    "that do not fall back fail there.", tmpdir=wanted, used=used)
    try:
        listener = Listener(family="AF_UNIX")  # what multiprocessing really creates
    except OSError as e:
        return fail(f"cannot bind a multiprocessing socket under TMPDIR={used}: {e}", ADVICE,
                    tmpdir=used)
    try:
        address = listener.address
    finally:
        listener.close()
    length = len(os.fsencode(address))
    detail = (f"bound {address} ({length} bytes; AF_UNIX allows {AF_UNIX_PATH_MAX})")
    if length > AF_UNIX_PATH_MAX - 16:
        return warn(detail + ": little room left for longer names other libraries use",
                    ADVICE, path_bytes=length)
    return ok(detail, path_bytes=length)
