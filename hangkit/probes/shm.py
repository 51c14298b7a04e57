"""shm: /dev/shm size and free space against what DataLoader workers will put there (DL-03).

Each worker passes batches to its rank through shared memory; with prefetch, about
ranks per node x workers x prefetch_factor batches live there at once. A full /dev/shm kills
workers with a bus error, or, in containers with 64 MB, stalls them.

The estimate uses the job's ranks per node (launcher variables), and
HANGKIT_DOCTOR_WORKERS (workers per rank, default 4) and HANGKIT_DOCTOR_BATCH_MB (one batch,
default 64) so users can state their own numbers.
"""

from __future__ import annotations

import contextlib
import os
import time

from hangkit.probes.api import Outcome, ProbeContext, fail, ok, warn
from hangkit.probes.environment import LOCAL_SIZE_VARIABLES

SHM = "/dev/shm"
PREFETCH_FACTOR = 2  # torch's default
ADVICE = ("Give workers room: fewer DataLoader workers or a smaller batch, or a larger "
          "/dev/shm (docker --shm-size; on clusters ask for it); or use "
          "torch.multiprocessing.set_sharing_strategy('file_system') with a TMPDIR on "
          "node-local disk (DL-03).")


def run(ctx: ProbeContext) -> Outcome:
    env = ctx.environ
    try:
        workers = int(env.get("HANGKIT_DOCTOR_WORKERS", "4").split(",")[-1])
        batch_mb = float(env.get("HANGKIT_DOCTOR_BATCH_MB", "64"))
    except ValueError as e:
        return fail(f"cannot read the workload: {e}", "HANGKIT_DOCTOR_WORKERS is a number of "
                    "workers and HANGKIT_DOCTOR_BATCH_MB a size in MB.")
    local = next((int(env[v]) for v in LOCAL_SIZE_VARIABLES if env.get(v, "").isdigit()), 1)
    try:
        st = os.statvfs(SHM)
    except OSError as e:
        return fail(f"{SHM} is not usable: {e.strerror}", ADVICE)
    total_mb = st.f_blocks * st.f_frsize / 2**20
    free_mb = st.f_bavail * st.f_frsize / 2**20
    written = _write_test(1)
    if written is not None:
        return fail(f"cannot write to {SHM}: {written}", ADVICE)
    need_mb = local * workers * PREFETCH_FACTOR * batch_mb
    data = {"total_mb": round(total_mb), "free_mb": round(free_mb), "need_mb": round(need_mb),
            "ranks_per_node": local, "workers": workers, "batch_mb": batch_mb}
    detail = (f"{SHM}: {free_mb:,.0f} MB free of {total_mb:,.0f} MB; {local} rank(s) x "
              f"{workers} workers x {PREFETCH_FACTOR} batches x {batch_mb:g} MB need "
              f"{need_mb:,.0f} MB")
    if free_mb < batch_mb:
        return fail(detail, ADVICE, **data)
    if free_mb < need_mb:
        return warn(detail, ADVICE, **data)
    return ok(detail, **data)


def _write_test(mb: int) -> str | None:
    """Writes and removes mb MB in /dev/shm: mounted read-only or full fails here, not later."""
    path = os.path.join(SHM, f"hangkit-doctor-{os.getpid()}-{time.monotonic_ns()}")
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * (mb << 20))
        return None
    except OSError as e:
        return e.strerror
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
