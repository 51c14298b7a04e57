"""The hang-prevention environment users' wrappers set before training starts."""

from __future__ import annotations

import os
import tempfile

# sun_path holds 108 bytes with the terminating NUL.
AF_UNIX_PATH_MAX = 107
# multiprocessing puts its sockets at $TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX.
_MP_SOCKET_SUFFIX = len("/pymp-xxxxxxxx/listener-xxxxxxxx")


def af_unix_path_length(tmpdir: str) -> int:
    """Length of the socket path multiprocessing would create under tmpdir."""
    return len(os.fsencode(tmpdir.rstrip("/") or "/")) + _MP_SOCKET_SUFFIX


def hang_safe_environment(env: dict[str, str]) -> tuple[dict[str, str], list[str], str | None]:
    """Returns (new environment, one line per change, a short TMPDIR created for the caller).

    The caller owns the created directory and removes it when the job ends.
    """
    env = dict(env)
    changes = []
    if env.get("PYTHONUNBUFFERED") != "1":
        env["PYTHONUNBUFFERED"] = "1"
        changes.append("PYTHONUNBUFFERED=1 (output reaches the log as it happens)")
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"
        changes.append("OMP_NUM_THREADS=1 (was unset; avoids oversubscribed thread pools)")
    if env.get("WANDB_SILENT") != "true":
        env["WANDB_SILENT"] = "true"
        changes.append("WANDB_SILENT=true")
    created = None
    tmpdir = env.get("TMPDIR") or tempfile.gettempdir()
    length = af_unix_path_length(tmpdir)
    if length > AF_UNIX_PATH_MAX:
        created = tempfile.mkdtemp(prefix="hk-", dir="/tmp")
        env["TMPDIR"] = created
        changes.append(f"TMPDIR={created} (socket paths under the old TMPDIR would be {length} "
                       f"bytes, over the AF_UNIX limit of {AF_UNIX_PATH_MAX})")
    return env, changes, created
